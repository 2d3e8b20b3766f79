//! A human-readable rendering of a plan: one line per stage, one per rank with its head / FFN / vocabulary
//! ranges (half-open) and exact bytes. Used by `shard-tool plan` and by the golden test files, so the format is
//! stable: change it only together with `UPDATE_GOLDEN=1`.

use std::fmt::Write;

use super::{ShardPlan, Slice};

impl ShardPlan {
    /// Multi-line summary without blank lines (golden files end a case at a blank line).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let total = self
            .shards
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.bytes()));
        let _ = writeln!(
            out,
            "tp={} pp={}: {} shard{}, {}",
            self.topology.tp,
            self.topology.pp,
            self.shards.len(),
            if self.shards.len() == 1 { "" } else { "s" },
            bytes(total)
        );
        for stage in &self.stages {
            let shards: Vec<_> = self
                .shards
                .iter()
                .filter(|s| s.stage == stage.index)
                .collect();
            let mut roles = Vec::new();
            if stage.embedding {
                roles.push("embedding");
            }
            if stage.head {
                let output = shards
                    .first()
                    .is_some_and(|s| s.tensors.iter().any(|t| t.name == "output.weight"));
                roles.push(if output {
                    "head"
                } else {
                    "head (tied token_embd)"
                });
            }
            let stage_bytes = shards
                .iter()
                .fold(0u64, |acc, s| acc.saturating_add(s.bytes()));
            let _ = writeln!(
                out,
                "stage {}: layers {}..{} ({}){}{}, {}",
                stage.index,
                stage.layers.start,
                stage.layers.end,
                stage.layers.len(),
                if roles.is_empty() { "" } else { ", " },
                roles.join(", "),
                bytes(stage_bytes)
            );
            for s in &shards {
                let sharing = shards
                    .iter()
                    .filter(|o| o.kv_heads.contains(&s.kv_heads.start))
                    .count();
                let shared = if sharing > 1 {
                    format!(" (x{sharing})")
                } else {
                    String::new()
                };
                let vocab = if s.vocab_rows.is_empty() {
                    String::new()
                } else {
                    format!(" vocab {}..{}", s.vocab_rows.start, s.vocab_rows.end)
                };
                let split = s.tensors.iter().filter(|t| t.slice != Slice::Whole).count();
                let _ = writeln!(
                    out,
                    "  rank {}: q {}..{} ({}) kv {}..{}{shared} ffn {}..{}{vocab}; {} tensors ({split} split), {}",
                    s.rank,
                    s.q_heads.start,
                    s.q_heads.end,
                    s.q_heads.len(),
                    s.kv_heads.start,
                    s.kv_heads.end,
                    s.ffn_rows.start,
                    s.ffn_rows.end,
                    s.tensors.len(),
                    bytes(s.bytes())
                );
            }
        }
        out.pop();
        out
    }
}

/// Exact bytes, then a rounded binary unit.
pub(crate) fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    let (value, unit) = if x >= KIB.powi(3) {
        (x / KIB.powi(3), "GiB")
    } else if x >= KIB.powi(2) {
        (x / KIB.powi(2), "MiB")
    } else {
        (x / KIB, "KiB")
    };
    format!("{n} bytes ({value:.2} {unit})")
}
