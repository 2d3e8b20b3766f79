//! Stop strings while streaming: text that might be the start of a stop string is held back until the next
//! piece decides it, and the output is cut just before the first match (the stop string itself is not
//! returned, as in OpenAI's API). Matches are found across token boundaries because the held-back tail is
//! searched together with each new piece.

/// What one [`StopMatcher::push`] releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text that is safe to send: it cannot be part of a stop string.
    pub text: String,
    /// Index (into the stop list) of the stop string that ended generation, if one just matched.
    pub stopped: Option<usize>,
}

/// Streaming stop-string matcher for one sequence.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (validation rejects them earlier).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: None,
        }
    }

    /// The stop string that ended generation, once one has matched.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.map(|i| self.stops[i].as_str())
    }

    /// Adds newly decoded text. After a match, everything further is discarded.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped.is_some() {
            return StopOutput::default();
        }
        self.held.push_str(text);
        // The earliest match wins; at equal positions the stop listed first.
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = first {
            self.held.truncate(pos);
            self.stopped = Some(i);
            return StopOutput {
                text: std::mem::take(&mut self.held),
                stopped: Some(i),
            };
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let release = self.held.len() - keep;
        let rest = self.held.split_off(release);
        StopOutput {
            text: std::mem::replace(&mut self.held, rest),
            stopped: None,
        }
    }

    /// Generation ended without a stop string: releases what was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (cut at a character boundary).
fn partial_suffix(text: &str, stop: &str) -> usize {
    let mut best = 0;
    for (k, _) in stop.char_indices().skip(1) {
        if k > text.len() {
            break;
        }
        if text.ends_with(&stop[..k]) {
            best = k;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Feeds pieces; returns everything released and the stop index.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, Option<usize>) {
        let mut m = matcher(stops);
        let mut out = Vec::new();
        for p in pieces {
            let o = m.push(p);
            out.push(o.text);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push(m.finish());
        (out, None)
    }

    #[test]
    fn matches_across_token_boundaries() {
        let (out, stop) = run(
            &["</answer>"],
            &["The answer", " is 4</", "ans", "wer> ignored"],
        );
        assert_eq!(out, vec!["The answer", " is 4", "", ""]);
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn releases_held_text_when_the_match_fails() {
        let (out, stop) = run(&["STOP"], &["ST", "O", "P!"]);
        assert_eq!(out, vec!["", "", ""]);
        assert_eq!(stop, Some(0));
        let (out, stop) = run(&["STOP"], &["ST", "O", "X", "ST"]);
        assert_eq!(out, vec!["", "", "STOX", "", "ST"]);
        assert_eq!(stop, None);
    }

    #[test]
    fn earliest_match_wins_and_overlaps_resolve() {
        let (out, stop) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, vec!["hel"]);
        assert_eq!(stop, Some(1));
        // "aab" after "aaa…": the held tail must be the longest partial match, not the first.
        let (out, stop) = run(&["aab"], &["a", "a", "a", "b"]);
        assert_eq!(out.concat(), "a");
        assert_eq!(stop, Some(0));
    }

    #[test]
    fn multibyte_stop_strings_split_only_at_characters() {
        let (out, stop) = run(&["。\n"], &["你好", "。", "\n再见"]);
        assert_eq!(out, vec!["你好", "", ""]);
        assert_eq!(stop, Some(0));
        let mut m = matcher(&["éa"]);
        assert_eq!(m.push("xé").text, "x");
        assert_eq!(m.push("b").text, "éb");
    }

    #[test]
    fn no_stops_passes_everything_and_nothing_after_a_stop() {
        let (out, stop) = run(&[], &["a", "b"]);
        assert_eq!(out, vec!["a", "b", ""]);
        assert_eq!(stop, None);
        let mut m = matcher(&["x"]);
        assert_eq!(m.push("axb").text, "a");
        assert_eq!(m.stopped(), Some("x"));
        assert_eq!(m.push("more"), StopOutput::default());
        assert_eq!(m.finish(), "");
    }
}
