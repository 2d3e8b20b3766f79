//! Golden plans: `testdata/plan/*.txt` hold cases in the style of raft-rs's datadriven testdata — comment lines
//! (`#`), one command line, `----`, the expected output, then a blank line before the next case.
//!
//! Command: `plan preset=NAME quant=TYPE tp=N pp=N [layers=0-14,15-29] [n_layer=N] [ctx=N [batch=N]]`.
//! Output: a model line, then [`ShardPlan::summary`], then with `ctx` the per-node memory (bf16 KV cache), or
//! `error: …` when the planner refuses the topology. Run with `UPDATE_GOLDEN=1` to rewrite the expected
//! outputs after an intended change, and review the diff.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use tessera_kernels::quant::GgmlType;

use super::summary::bytes;
use super::{Topology, memory_report, plan};
use crate::shapes::{Preset, tensor_descs};

struct Case {
    /// Comment lines and the command line, verbatim.
    preamble: String,
    command: String,
    expected: String,
    /// 1-based line of the command, for failure messages.
    line: usize,
}

fn parse_cases(text: &str) -> Vec<Case> {
    let lines: Vec<&str> = text.lines().collect();
    let mut cases = Vec::new();
    let mut preamble = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.trim().is_empty() {
            continue;
        }
        preamble.push_str(line);
        preamble.push('\n');
        if line.starts_with('#') {
            continue;
        }
        let command_line = i;
        assert_eq!(
            lines.get(i).copied(),
            Some("----"),
            "line {}: expected `----` after the command",
            i + 1
        );
        i += 1;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i]);
            i += 1;
        }
        cases.push(Case {
            preamble: std::mem::take(&mut preamble),
            command: line.to_string(),
            expected: expected.join("\n"),
            line: command_line,
        });
    }
    cases
}

fn run(command: &str) -> String {
    let mut words = command.split_whitespace();
    assert_eq!(words.next(), Some("plan"), "unknown command `{command}`");
    let args: HashMap<&str, &str> = words
        .map(|w| {
            w.split_once('=')
                .unwrap_or_else(|| panic!("`{w}` is not key=value"))
        })
        .collect();
    for key in args.keys() {
        assert!(
            [
                "preset", "quant", "tp", "pp", "layers", "n_layer", "ctx", "batch"
            ]
            .contains(key),
            "unknown key {key}"
        );
    }
    let num = |key: &str| {
        args.get(key)
            .map(|v| v.parse::<usize>().unwrap_or_else(|_| panic!("{key}={v}")))
    };
    let preset: Preset = args["preset"].parse().unwrap();
    let quant =
        GgmlType::from_name(args["quant"]).unwrap_or_else(|| panic!("quant {}", args["quant"]));
    let config = preset.config_with_layers(num("n_layer"));
    let tensors = tensor_descs(&config, quant);
    let mut topo = Topology::new(num("tp").expect("tp"), num("pp").expect("pp"));
    if let Some(text) = args.get("layers") {
        match Topology::parse_layer_ranges(text) {
            Ok(ranges) => topo = topo.with_layer_ranges(ranges),
            Err(e) => return format!("error: {e}"),
        }
    }
    let p = match plan(&config, &tensors, &topo) {
        Ok(p) => p,
        Err(e) => return format!("error: {e}"),
    };
    let source: u64 = tensors.iter().map(|t| t.n_bytes().unwrap()).sum();
    let mut out = format!(
        "model {} ({}): {} layers, {} q / {} kv heads of {}, ffn {}, vocab {}{}; {} tensors, {}\n",
        preset,
        quant.name(),
        config.n_layer,
        config.n_head,
        config.n_head_kv,
        config.head_dim,
        config.n_ff,
        config.n_vocab,
        if config.tied_embeddings { ", tied" } else { "" },
        tensors.len(),
        bytes(source)
    );
    out.push_str(&p.summary());
    if let Some(ctx) = num("ctx") {
        let batch = num("batch").unwrap_or(1);
        let _ = write!(
            out,
            "\nmemory ctx={ctx} batch={batch}, bf16 KV cache (weights + KV, no activations):"
        );
        // Consecutive ranks of a stage with identical numbers share a line.
        let report = memory_report(&p, &config, ctx, batch, 2);
        for group in report.chunk_by(|a, b| {
            (a.stage, a.weight_bytes, a.kv_cache_bytes)
                == (b.stage, b.weight_bytes, b.kv_cache_bytes)
        }) {
            let (first, last) = (&group[0], &group[group.len() - 1]);
            let ranks = if group.len() == 1 {
                format!("rank {}", first.rank)
            } else {
                format!("ranks {}-{}", first.rank, last.rank)
            };
            let _ = write!(
                out,
                "\n  stage {} {ranks}: weights {} + kv {} = {}",
                first.stage, first.weight_bytes, first.kv_cache_bytes, first.total
            );
        }
    }
    out
}

#[test]
fn golden_plans() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/plan");
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no golden files in {}", dir.display());
    let mut failures = Vec::new();
    let mut n_cases = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rewritten = String::new();
        for case in parse_cases(&text) {
            n_cases += 1;
            let actual = run(&case.command);
            if actual != case.expected {
                let (e, a): (Vec<_>, Vec<_>) =
                    (case.expected.lines().collect(), actual.lines().collect());
                let at = e
                    .iter()
                    .zip(&a)
                    .position(|(x, y)| x != y)
                    .unwrap_or(e.len().min(a.len()));
                failures.push(format!(
                    "{}:{} `{}`: output line {} differs\n  expected: {}\n  actual:   {}",
                    path.display(),
                    case.line,
                    case.command,
                    at + 1,
                    e.get(at).unwrap_or(&"<end>"),
                    a.get(at).unwrap_or(&"<end>")
                ));
            }
            if !rewritten.is_empty() {
                rewritten.push('\n');
            }
            let _ = writeln!(rewritten, "{}----\n{actual}", case.preamble);
        }
        if update && rewritten != text {
            std::fs::write(&path, rewritten).unwrap();
        }
    }
    assert!(n_cases > 0);
    assert!(
        update || failures.is_empty(),
        "{} golden case(s) differ (rerun with UPDATE_GOLDEN=1 to accept):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
