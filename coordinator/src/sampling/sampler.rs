//! The token sampler: full-vocabulary logits in, one token (with log-probabilities) out.

use std::collections::{HashMap, HashSet};

use super::{Rng, SamplingError, SamplingParams};
use tessera_kernels::softmax_reduce::{self, by_logit_desc, top_m};

/// One chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Natural log of the token's probability under the distribution after penalties and logit bias, at
    /// temperature 1, over the whole vocabulary: the model's own judgement as the request shaped it, before
    /// top-k / top-p / min-p truncation and temperature (which would make the chosen token's log-probability
    /// 0 under greedy decoding). OpenAI does not document which distribution it reports; this one is the
    /// model's raw distribution whenever no penalty or bias is set.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the same distribution, most likely first (ties: lower id
    /// first); empty unless the request asked for log-probabilities.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Most best logits a sequence takes instead of its whole row (see [`Sampler::candidates_needed`]).
pub const MAX_CANDIDATES: usize = 64;

/// The best entries of one logits row and the log-sum-exp of the whole row: all that greedy and top-k
/// sampling and their log-probabilities need, a few hundred bytes instead of the vocabulary (a cluster's last
/// stage sends these per vocabulary slice; see `serve::remote`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopLogits {
    /// (logit, token id), sorted by [`by_logit_desc`], each read by
    /// [`softmax_reduce::sampling_logit`] as [`Sampler::sample`] reads the whole row.
    pub best: Vec<(f32, u32)>,
    /// ln Σ e^logit over the whole row (-inf when no logit is finite).
    pub lse: f64,
}

/// Samples the tokens of one sequence. Keeps the counts the penalties need; call [`Sampler::observe`] with the
/// prompt so the repetition penalty also covers it.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    rng: Rng,
    /// Tokens of the prompt (repetition penalty only).
    prompt: HashSet<u32>,
    /// Generated tokens and how often each occurred.
    generated: HashMap<u32, u32>,
    /// Logits after penalties and bias (`vocab_size`).
    work: Vec<f32>,
    /// Candidate (logit, id) pairs still in the running.
    cand: Vec<(f32, u32)>,
    /// Per-candidate scratch (logits, then weights).
    weights: Vec<f32>,
}

impl Sampler {
    /// Validates `params` and starts a sequence over a vocabulary of `vocab_size` logits.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Sampler, SamplingError> {
        params.validate(vocab_size)?;
        let seed = params.seed.unwrap_or_else(Rng::entropy_seed);
        Ok(Sampler {
            params,
            vocab_size,
            rng: Rng::from_seed(seed),
            prompt: HashSet::new(),
            generated: HashMap::new(),
            work: Vec::with_capacity(vocab_size),
            cand: Vec::new(),
            weights: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Notes prompt tokens for the repetition penalty (frequency and presence penalties count only generated
    /// tokens, as OpenAI and vLLM do).
    /// Ids outside the vocabulary are ignored.
    pub fn observe(&mut self, prompt: &[u32]) {
        if self.params.repetition_penalty != 1.0 {
            let n = self.vocab_size;
            self.prompt
                .extend(prompt.iter().copied().filter(|&t| (t as usize) < n));
        }
    }

    /// Chooses the next token from `logits` (one per vocabulary entry; NaN counts as impossible) and records
    /// it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, SamplingError> {
        if logits.len() != self.vocab_size {
            return Err(SamplingError::LogitsLength {
                got: logits.len(),
                expected: self.vocab_size,
            });
        }
        self.work.clear();
        self.work
            .extend(logits.iter().map(|&l| softmax_reduce::sampling_logit(l)));
        self.apply_penalties();
        for &(token, bias) in &self.params.logit_bias {
            self.work[token as usize] += bias;
        }
        let lse = softmax_reduce::log_sum_exp(&self.work).ok_or(SamplingError::NoFiniteLogits)?;

        let id = if self.params.temperature == 0.0 {
            self.argmax()
        } else {
            self.draw(lse)
        };
        let logprob = (f64::from(self.work[id as usize]) - lse) as f32;
        let top_logprobs = match self.params.logprobs {
            Some(n) if n > 0 => top_m(&self.work, n, 0)
                .into_iter()
                .map(|(l, t)| (t, (f64::from(l) - lse) as f32))
                .collect(),
            _ => Vec::new(),
        };
        *self.generated.entry(id).or_insert(0) += 1;
        Ok(SampledToken {
            id,
            logprob,
            top_logprobs,
        })
    }

    /// How many best logits of a row this sequence's next token needs when a pipeline sends those instead
    /// of the whole row ([`Sampler::sample_top`]); 0 when it needs the whole row: penalties and logit bias
    /// move logits outside any best set, and top-p, min-p or temperature without top-k draw from the whole
    /// vocabulary.
    pub fn candidates_needed(&self) -> usize {
        let p = &self.params;
        if p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
            || !p.logit_bias.is_empty()
        {
            return 0;
        }
        let k = match (p.temperature == 0.0, p.top_k) {
            (true, _) => 1,
            (false, 0) => return 0,
            (false, k) => k,
        };
        let k = k.max(p.logprobs.unwrap_or(0)).min(self.vocab_size);
        if k > MAX_CANDIDATES { 0 } else { k }
    }

    /// [`Sampler::sample`] from a row's best logits (at least [`Sampler::candidates_needed`] of them, or
    /// every finite one): the same token as from the whole row, and the same log-probabilities up to the
    /// rounding of the log-sum-exp.
    pub fn sample_top(&mut self, top: &TopLogits) -> Result<SampledToken, SamplingError> {
        if self.candidates_needed() == 0 {
            return Err(SamplingError::NeedsWholeRow);
        }
        let lse = top.lse;
        let Some(&best) = top.best.first().filter(|_| lse.is_finite()) else {
            return Err(SamplingError::NoFiniteLogits);
        };
        let (logit, id) = if self.params.temperature == 0.0 {
            best
        } else {
            self.cand.clear();
            self.cand
                .extend(top.best.iter().take(self.params.top_k).copied());
            let id = self.truncate_and_draw(true, lse);
            let logit = top.best.iter().find(|c| c.1 == id).map_or(best.0, |c| c.0);
            (logit, id)
        };
        let top_logprobs = match self.params.logprobs {
            Some(n) if n > 0 => top
                .best
                .iter()
                .take(n)
                .map(|&(l, t)| (t, (f64::from(l) - lse) as f32))
                .collect(),
            _ => Vec::new(),
        };
        *self.generated.entry(id).or_insert(0) += 1;
        Ok(SampledToken {
            id,
            logprob: (f64::from(logit) - lse) as f32,
            top_logprobs,
        })
    }

    fn apply_penalties(&mut self) {
        let p = &self.params;
        let rep = p.repetition_penalty;
        if rep != 1.0 {
            let penalize = |l: &mut f32| *l = if *l <= 0.0 { *l * rep } else { *l / rep };
            for &t in &self.prompt {
                penalize(&mut self.work[t as usize]);
            }
            for &t in self.generated.keys().filter(|t| !self.prompt.contains(t)) {
                penalize(&mut self.work[t as usize]);
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.generated {
                self.work[t as usize] -= count as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// Most likely token; the lowest id among equals.
    fn argmax(&self) -> u32 {
        let max = softmax_reduce::max(&self.work);
        self.work.iter().position(|&l| l == max).unwrap_or(0) as u32
    }

    /// top-k, then [`Sampler::truncate_and_draw`].
    fn draw(&mut self, lse: f64) -> u32 {
        let top_k = self.params.top_k;
        // Candidates: the top k, sorted by `by_logit_desc`; or every finite logit, in id order.
        let sorted = top_k > 0;
        if sorted {
            self.cand = top_m(&self.work, top_k, 0);
        } else {
            self.cand.clear();
            self.cand.extend(
                self.work
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_finite())
                    .map(|(i, &l)| (l, i as u32)),
            );
        }
        self.truncate_and_draw(sorted, lse)
    }

    /// top-p → min-p → temperature → a draw, over the candidates in `self.cand` (`sorted` by
    /// `by_logit_desc`, or every finite logit in id order).
    fn truncate_and_draw(&mut self, sorted: bool, lse: f64) -> u32 {
        let SamplingParams {
            top_p,
            min_p,
            temperature,
            ..
        } = self.params;
        if top_p < 1.0 {
            self.top_p(f64::from(top_p), sorted, lse);
        }
        if min_p > 0.0 {
            let max = self
                .cand
                .iter()
                .map(|c| c.0)
                .fold(f32::NEG_INFINITY, f32::max);
            // llama.cpp: keep logit >= max + ln(min_p), i.e. probability >= min_p × the largest.
            let threshold = max + min_p.ln();
            self.cand.retain(|c| c.0 >= threshold);
        }

        // Draw from softmax(logit / temperature) over the survivors, in their current order.
        let inv_t = 1.0 / temperature;
        self.weights.clear();
        self.weights.extend(self.cand.iter().map(|c| c.0));
        let max = softmax_reduce::max(&self.weights);
        let total = softmax_reduce::sum_exp(&self.weights, max, inv_t);
        softmax_reduce::exp_in_place(&mut self.weights, max, inv_t);
        let mut target = self.rng.next_f64() * total;
        for (c, &w) in self.cand.iter().zip(&self.weights) {
            target -= f64::from(w);
            if target < 0.0 {
                return c.1;
            }
        }
        // Rounding left a sliver past the last candidate.
        self.cand.last().map_or(0, |c| c.1)
    }

    /// Keeps the smallest set of most likely candidates whose probability (softmax over the current
    /// candidates, temperature 1) reaches `top_p`, including the token that crosses it (llama.cpp).
    ///
    /// After top-k the candidates are sorted and renormalised over the k. Otherwise they are the whole
    /// vocabulary, whose log-sum-exp `lse_all` is known: the best 256, 1024, … are found by a heap scan
    /// until they hold enough mass, so a peaked distribution (the usual case) never sorts 128k logits.
    fn top_p(&mut self, top_p: f64, sorted: bool, lse_all: f64) {
        if sorted {
            self.weights.clear();
            self.weights.extend(self.cand.iter().map(|c| c.0));
            let Some(lse) = softmax_reduce::log_sum_exp(&self.weights) else {
                return;
            };
            let keep = prefix_reaching(&self.cand, top_p, lse).unwrap_or(self.cand.len());
            self.cand.truncate(keep);
            return;
        }
        let n = self.cand.len();
        let mut m = n.min(256);
        while m < n / 4 {
            let best = top_m(&self.work, m, 0);
            if let Some(keep) = prefix_reaching(&best, top_p, lse_all) {
                self.cand = best;
                self.cand.truncate(keep);
                return;
            }
            m *= 4;
        }
        self.cand.sort_unstable_by(by_logit_desc);
        let keep = prefix_reaching(&self.cand, top_p, lse_all).unwrap_or(n);
        self.cand.truncate(keep);
    }
}

/// The log-probability of `token` under the model's own distribution over `logits` (no penalties, bias or
/// temperature: what a prompt token's log-probability is) and the `top` most likely tokens with theirs, most
/// likely first. `None` when no logit is finite or `token` is outside the row.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> Option<(f32, Vec<(u32, f32)>)> {
    let row: Vec<f32> = logits
        .iter()
        .map(|&l| softmax_reduce::sampling_logit(l))
        .collect();
    let lse = softmax_reduce::log_sum_exp(&row)?;
    let logprob = (f64::from(*row.get(token as usize)?) - lse) as f32;
    let top = top_m(&row, top, 0)
        .into_iter()
        .map(|(l, t)| (t, (f64::from(l) - lse) as f32))
        .collect();
    Some((logprob, top))
}

/// Length of the shortest prefix of `sorted` whose probability mass (relative to `lse`) reaches `target`.
fn prefix_reaching(sorted: &[(f32, u32)], target: f64, lse: f64) -> Option<usize> {
    let lse = lse as f32;
    let mut cum = 0.0f64;
    for (i, c) in sorted.iter().enumerate() {
        cum += f64::from(softmax_reduce::exp(c.0 - lse));
        if cum >= target {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams, n: usize) -> Sampler {
        Sampler::new(params, n).unwrap()
    }

    /// Logits whose softmax is exactly `probs` (up to rounding).
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs
            .iter()
            .map(|&p| {
                if p == 0.0 {
                    f32::NEG_INFINITY
                } else {
                    p.ln() as f32
                }
            })
            .collect()
    }

    /// The set of tokens a sampler can return, found by drawing many times with different seeds.
    fn support(params: SamplingParams, logits: &[f32], draws: u64) -> Vec<u32> {
        let mut seen: Vec<u32> = (0..draws)
            .map(|seed| {
                sampler(
                    SamplingParams {
                        seed: Some(seed),
                        ..params.clone()
                    },
                    logits.len(),
                )
                .sample(logits)
                .unwrap()
                .id
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = sampler(SamplingParams::greedy(), 5);
        assert_eq!(
            s.sample(&[0.1, 3.0, -1.0, 2.9, 3.0]).unwrap().id,
            1,
            "ties go to the lower id"
        );
        assert_eq!(
            s.sample(&[f32::NAN, -5.0, -4.0, f32::NEG_INFINITY, -4.5])
                .unwrap()
                .id,
            2
        );
        let e = s.sample(&[f32::NEG_INFINITY; 5]).unwrap_err();
        assert_eq!(e, SamplingError::NoFiniteLogits);
        assert_eq!(
            s.sample(&[0.0; 4]).unwrap_err().to_string(),
            "logits have 4 entries, expected the vocabulary size 5"
        );
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0).sin() * 3.0)
            .collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 50,
            top_p: 0.9,
            seed: Some(1234),
            ..Default::default()
        };
        let run = || {
            let mut s = sampler(params.clone(), logits.len());
            (0..64)
                .map(|_| s.sample(&logits).unwrap().id)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let b = {
            let mut s = sampler(
                SamplingParams {
                    seed: Some(1235),
                    ..params.clone()
                },
                logits.len(),
            );
            (0..64)
                .map(|_| s.sample(&logits).unwrap().id)
                .collect::<Vec<_>>()
        };
        assert_ne!(a, b, "a different seed gives a different sequence");
        // Pinned: the sequence for this seed must not change between versions.
        assert_eq!(&a[..8], PINNED_FIRST_8);
    }

    const PINNED_FIRST_8: &[u32] = &[694, 904, 447, 393, 924, 813, 208, 657];

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let logits = logits_of(&[0.05, 0.3, 0.1, 0.25, 0.2, 0.1]);
        let p = SamplingParams {
            top_k: 3,
            ..Default::default()
        };
        assert_eq!(support(p, &logits, 400), vec![1, 3, 4]);
        // Ties at the cut: lower id wins.
        let p = SamplingParams {
            top_k: 2,
            ..Default::default()
        };
        assert_eq!(support(p, &[1.0, 2.0, 1.0, 2.0, 2.0], 400), vec![1, 3]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let logits = logits_of(&[0.1, 0.4, 0.05, 0.3, 0.15]);
        // Sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (0), 0.05 (2). Cumulative 0.4, 0.7, 0.85, 0.95, 1.0.
        let sup = |top_p| {
            support(
                SamplingParams {
                    top_p,
                    ..Default::default()
                },
                &logits,
                600,
            )
        };
        assert_eq!(sup(0.35), vec![1]);
        assert_eq!(sup(0.5), vec![1, 3]);
        assert_eq!(sup(0.8), vec![1, 3, 4]);
        assert_eq!(sup(0.9), vec![0, 1, 3, 4]);
        assert_eq!(sup(1.0), vec![0, 1, 2, 3, 4]);
        // After top-k the mass is renormalised over the k survivors (llama.cpp): 0.4/0.7 ≈ 0.57 < 0.6.
        let p = SamplingParams {
            top_k: 2,
            top_p: 0.6,
            ..Default::default()
        };
        assert_eq!(support(p, &logits, 400), vec![1, 3]);
    }

    #[test]
    fn top_p_on_a_large_vocabulary_grows_its_prefix() {
        // 2000 tokens of equal probability: 0.4996 of the mass needs 1000 of them (999 hold 0.4995), past the
        // first 256 selected and the first 1024.
        let logits = vec![0.0f32; 2000];
        let mut s = sampler(
            SamplingParams {
                top_p: 0.4996,
                ..Default::default()
            },
            2000,
        );
        s.work = logits.clone();
        s.cand = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        let lse = softmax_reduce::log_sum_exp(&s.work).unwrap();
        s.top_p(0.4996, false, lse);
        assert_eq!(s.cand.len(), 1000);
        let ids: Vec<u32> = s.cand.iter().map(|c| c.1).collect();
        assert_eq!(
            ids,
            (0..1000).collect::<Vec<u32>>(),
            "ties kept by lower id"
        );
    }

    #[test]
    fn min_p_keeps_tokens_at_least_min_p_of_the_best() {
        let logits = logits_of(&[0.5, 0.2, 0.1, 0.04, 0.16]);
        let sup = |min_p| {
            support(
                SamplingParams {
                    min_p,
                    ..Default::default()
                },
                &logits,
                600,
            )
        };
        // Threshold 0.3 × 0.5 = 0.15: keeps 0.5, 0.2, 0.16.
        assert_eq!(sup(0.3), vec![0, 1, 4]);
        // Threshold 0.1: adds 0.1 (at the bound, kept: >=).
        assert_eq!(sup(0.19), vec![0, 1, 2, 4]);
        assert_eq!(sup(1.0), vec![0]);
    }

    #[test]
    fn penalties_math() {
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logit_bias: vec![(3, -1.0)],
            logprobs: Some(4),
            ..Default::default()
        };
        let mut s = sampler(params, 4);
        s.observe(&[0, 1, 99]); // 99 is outside the vocabulary: ignored
        s.generated.insert(1, 2); // token 1 generated twice
        s.generated.insert(2, 1); // token 2 once
        let logits = [4.0f32, -2.0, 3.0, 1.0];
        let got = s.sample(&logits).unwrap();
        // 0: prompt, positive → 4/2 = 2. 1: prompt and output, negative → -2*2 = -4, then -2*0.5 - 0.25 → -5.25.
        // 2: output only → 3/2 = 1.5, then -0.5 - 0.25 → 0.75. 3: bias → 0.
        let expected = [2.0f64, -5.25, 0.75, 0.0];
        assert_eq!(s.work, expected.map(|x| x as f32));
        assert_eq!(got.id, 0);
        let lse = expected.iter().map(|x| x.exp()).sum::<f64>().ln();
        assert!((f64::from(got.logprob) - (2.0 - lse)).abs() < 1e-6);
        let order: Vec<u32> = got.top_logprobs.iter().map(|t| t.0).collect();
        assert_eq!(order, vec![0, 2, 3, 1]);
        for (t, lp) in &got.top_logprobs {
            assert!((f64::from(*lp) - (expected[*t as usize] - lse)).abs() < 1e-6);
        }
        assert_eq!(s.generated[&0], 1, "the chosen token is counted");
    }

    /// What a cluster's last stage sends for a row: its k best logits and log-sum-exp.
    fn top_of(row: &[f32], k: usize) -> TopLogits {
        TopLogits {
            best: top_m(row, k, 0),
            lse: softmax_reduce::log_sum_exp(row).unwrap(),
        }
    }

    /// Greedy and top-k sampling from a row's best logits give the tokens the whole row gives (same seed,
    /// same draws) and the same log-probabilities up to rounding, over many steps of one sequence.
    #[test]
    fn best_logits_sample_like_the_whole_row() {
        let mut rng = Rng::from_seed(5);
        let rows: Vec<Vec<f32>> = (0..200)
            .map(|_| {
                (0..3000)
                    .map(|i| {
                        // Ties among the best, and one NaN and one +inf now and then.
                        let x = ((rng.next_f64() * 12.0).floor() / 2.0) as f32;
                        match (i, rng.next_u64() % 50) {
                            (7, 0) => f32::NAN,
                            (9, 1) => f32::INFINITY,
                            _ => x,
                        }
                    })
                    .collect()
            })
            .collect();
        let cases = [
            SamplingParams {
                logprobs: Some(5),
                ..SamplingParams::greedy()
            },
            SamplingParams {
                temperature: 0.8,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                logprobs: Some(3),
                seed: Some(11),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.3,
                top_k: 64,
                seed: Some(12),
                ..Default::default()
            },
        ];
        for params in cases {
            let mut whole = sampler(params.clone(), 3000);
            let mut best = sampler(params.clone(), 3000);
            let k = best.candidates_needed();
            assert!(k > 0, "{params:?}");
            for row in &rows {
                let clean: Vec<f32> = row
                    .iter()
                    .map(|&l| softmax_reduce::sampling_logit(l))
                    .collect();
                let want = whole.sample(row).unwrap();
                let got = best.sample_top(&top_of(&clean, k)).unwrap();
                assert_eq!(got.id, want.id, "{params:?}");
                assert!(
                    (got.logprob - want.logprob).abs() < 1e-5,
                    "{got:?} {want:?}"
                );
                assert_eq!(got.top_logprobs.len(), want.top_logprobs.len());
                for (g, w) in got.top_logprobs.iter().zip(&want.top_logprobs) {
                    assert_eq!(g.0, w.0);
                    assert!((g.1 - w.1).abs() < 1e-5, "{got:?} {want:?}");
                }
            }
        }
    }

    #[test]
    fn whole_rows_when_the_sampling_needs_them() {
        let needed = |params: SamplingParams| sampler(params, 1000).candidates_needed();
        let greedy = SamplingParams::greedy();
        assert_eq!(needed(greedy.clone()), 1);
        assert_eq!(
            needed(SamplingParams {
                logprobs: Some(20),
                ..greedy.clone()
            }),
            20
        );
        let top_k = |k| SamplingParams {
            temperature: 0.7,
            top_k: k,
            ..Default::default()
        };
        assert_eq!(needed(top_k(40)), 40);
        assert_eq!(needed(top_k(MAX_CANDIDATES + 1)), 0);
        // Temperature over the whole vocabulary, penalties and bias: the whole row.
        assert_eq!(needed(top_k(0)), 0);
        for params in [
            SamplingParams {
                repetition_penalty: 1.1,
                ..greedy.clone()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..greedy.clone()
            },
            SamplingParams {
                frequency_penalty: 0.5,
                ..greedy.clone()
            },
            SamplingParams {
                logit_bias: vec![(3, 1.0)],
                ..greedy.clone()
            },
        ] {
            assert_eq!(needed(params.clone()), 0, "{params:?}");
            let err = sampler(params, 1000)
                .sample_top(&top_of(&[0.0; 1000], 1))
                .unwrap_err();
            assert_eq!(err, SamplingError::NeedsWholeRow);
        }
    }

    #[test]
    fn logprobs_ignore_truncation_and_temperature() {
        let logits = logits_of(&[0.5, 0.3, 0.2]);
        let params = SamplingParams {
            temperature: 0.3,
            top_k: 1,
            logprobs: Some(2),
            seed: Some(7),
            ..Default::default()
        };
        let got = sampler(params, 3).sample(&logits).unwrap();
        assert_eq!(got.id, 0);
        assert!((got.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(got.top_logprobs.len(), 2);
        assert!((got.top_logprobs[1].1 - 0.3f32.ln()).abs() < 1e-6);
        let none = sampler(
            SamplingParams {
                logprobs: Some(0),
                ..Default::default()
            },
            3,
        )
        .sample(&logits)
        .unwrap();
        assert!(none.top_logprobs.is_empty());
    }

    #[test]
    fn temperature_sharpens_the_draw() {
        // At a low temperature a 0.6/0.4 split becomes nearly deterministic; at 1 both appear.
        let logits = logits_of(&[0.6, 0.4]);
        let count = |temperature: f32| {
            (0..400u64)
                .filter(|&seed| {
                    let p = SamplingParams {
                        temperature,
                        seed: Some(seed),
                        ..Default::default()
                    };
                    sampler(p, 2).sample(&logits).unwrap().id == 1
                })
                .count()
        };
        let (cold, warm) = (count(0.05), count(1.0));
        assert!(cold < 5, "{cold}");
        assert!((120..200).contains(&warm), "{warm}");
    }
}
