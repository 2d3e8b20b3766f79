//! Pipeline stages: contiguous, non-empty layer ranges, either given by the user (checked to tile the model)
//! or balanced by bytes.
//!
//! Balancing minimises the largest stage, where a stage weighs its layers' bytes plus `token_embd` on the first
//! stage and `output_norm` + LM head on the last (`rope_freqs` is on every stage and moves nothing). It is an
//! exact dynamic programme over (stage, end layer), O(pp·n_layer²): about 2·10⁶ steps for 405B at pp=126.
//! Among partitions with the same largest stage it prefers the smaller sum of squared stage sizes (judged
//! prefix by prefix), so the slack is spread rather than piled on one stage; remaining ties go to the earliest
//! cut, which keeps the result deterministic.

use std::ops::Range;

use super::roles::Inventory;
use crate::error::{Error, Result};

/// Parses `"0-14,15-29"` (inclusive bounds; `"7"` is layer 7 alone) into half-open ranges.
pub(crate) fn parse_layer_ranges(text: &str) -> Result<Vec<Range<usize>>> {
    let bad =
        |part: &str, why: &str| Error::Plan(format!("layer range `{part}` in `{text}`: {why}"));
    if text.trim().is_empty() {
        return Err(Error::Plan(
            "empty layer-range list; expected e.g. `0-14,15-29`".into(),
        ));
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let num = |s: &str| {
                s.trim().parse::<usize>().map_err(|_| {
                    bad(
                        part,
                        "expected `FIRST-LAST` with layer numbers, e.g. `0-14`",
                    )
                })
            };
            let (first, last) = (num(a)?, num(b)?);
            if last < first {
                return Err(bad(part, "the last layer comes before the first"));
            }
            let end = last
                .checked_add(1)
                .ok_or_else(|| bad(part, "layer number too large"))?;
            Ok(first..end)
        })
        .collect()
}

/// Checks explicit half-open ranges: one per stage, non-empty, contiguous, covering `0..n_layer`.
pub(crate) fn check_ranges(
    ranges: &[Range<usize>],
    pp: usize,
    n_layer: usize,
) -> Result<Vec<Range<usize>>> {
    let show = |r: &Range<usize>| format!("{}-{}", r.start, r.end.saturating_sub(1));
    if ranges.len() != pp {
        return Err(Error::Plan(format!(
            "{} layer ranges given for pp={pp}; give one range per stage",
            ranges.len()
        )));
    }
    let mut next = 0usize;
    for (stage, r) in ranges.iter().enumerate() {
        if r.end <= r.start {
            return Err(Error::Plan(format!(
                "layer range {}..{} of stage {stage} is empty; every stage needs at least one layer",
                r.start, r.end
            )));
        }
        if r.start > next {
            let missing = if r.start - 1 == next {
                format!("layer {next} is")
            } else {
                format!("layers {next}-{} are", r.start - 1)
            };
            return Err(Error::Plan(format!(
                "layer ranges leave a gap: {missing} in no stage (stage {stage} starts at layer {})",
                r.start
            )));
        }
        if r.start < next {
            return Err(Error::Plan(format!(
                "layer ranges overlap: stage {stage} ({}) starts at layer {}, but layer {} is already in stage {}",
                show(r),
                r.start,
                r.start,
                stage.saturating_sub(1)
            )));
        }
        next = r.end;
    }
    if next != n_layer {
        return Err(Error::Plan(format!(
            "layer ranges end at layer {} but the model has {n_layer} layers (0-{})",
            next.saturating_sub(1),
            n_layer.saturating_sub(1)
        )));
    }
    Ok(ranges.to_vec())
}

/// Byte-balanced contiguous layer ranges for `pp` stages (`1 ≤ pp ≤ n_layer`, checked by the caller).
pub(crate) fn balance(inventory: &Inventory, pp: usize) -> Result<Vec<Range<usize>>> {
    let n = inventory.layer_bytes.len();
    if pp == 0 || pp > n {
        return Err(Error::Plan(format!(
            "cannot place {n} layers on {pp} pipeline stages"
        )));
    }
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0u128);
    for &b in &inventory.layer_bytes {
        prefix.push(prefix[prefix.len() - 1] + u128::from(b));
    }
    let last = pp - 1;
    let cost = |stage: usize, a: usize, b: usize| {
        let mut c = prefix[b] - prefix[a];
        if stage == 0 {
            c += u128::from(inventory.embedding_bytes);
        }
        if stage == last {
            c += u128::from(inventory.head_bytes);
        }
        c
    };
    let score =
        |prev: (u128, u128), c: u128| (prev.0.max(c), prev.1.saturating_add(c.saturating_mul(c)));

    const NONE: (u128, u128) = (u128::MAX, u128::MAX);
    // best[s][b]: the best score of stages 0..=s holding layers 0..b; from[s][b]: where stage s starts.
    let mut best = vec![vec![NONE; n + 1]; pp];
    let mut from = vec![vec![0usize; n + 1]; pp];
    for (b, slot) in best[0].iter_mut().enumerate().skip(1) {
        *slot = score((0, 0), cost(0, 0, b));
    }
    for s in 1..pp {
        // Stage s ends at b, leaving at least one layer for each later stage.
        for b in s + 1..=n - (last - s) {
            for a in s..b {
                if best[s - 1][a] == NONE {
                    continue;
                }
                let candidate = score(best[s - 1][a], cost(s, a, b));
                if candidate < best[s][b] {
                    best[s][b] = candidate;
                    from[s][b] = a;
                }
            }
        }
    }
    let mut ranges = vec![0..0; pp];
    let mut end = n;
    for s in (0..pp).rev() {
        let start = if s == 0 { 0 } else { from[s][end] };
        ranges[s] = start..end;
        end = start;
    }
    Ok(ranges)
}
