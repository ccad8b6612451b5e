//! The dialogs the load generator replays (`assets/dialogs.jsonl`, one JSON object per line with
//! a `turns` array), and the per-speaker scripts cut from them.
//!
//! Turn `i` of a dialog is said by speaker `i mod 2`. A pair of users walks the dialogs from its
//! own starting point; each user of the pair sends its own turns, in order, and moves on to the
//! next dialog at the end of one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Deserialize;

/// Where the dialogs are looked for when `--dialogs` is not given: relative to the current
/// directory, then the copy in the source tree this binary was built from.
pub const DEFAULT_PATH: &str = "assets/dialogs.jsonl";

/// All the dialogs of a file, each a list of non-empty turns.
pub struct Dialogs {
    pub dialogs: Vec<Vec<String>>,
    /// The file they were read from.
    pub path: PathBuf,
    /// Total number of turns.
    pub turns: usize,
}

#[derive(Deserialize)]
struct Line {
    turns: Vec<String>,
}

impl Dialogs {
    /// Reads `path`, or the default locations when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Dialogs> {
        let path = match path {
            Some(p) => p.to_owned(),
            None => default_path().with_context(|| {
                format!("no {DEFAULT_PATH} in the current directory or the source tree; pass --dialogs PATH")
            })?,
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses JSON lines; blank lines are skipped, empty turns dropped, empty dialogs skipped.
    pub fn parse(text: &str, path: PathBuf) -> anyhow::Result<Dialogs> {
        let mut dialogs = Vec::new();
        for (n, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a dialog object with \"turns\"", path.display(), n + 1))?;
            let turns: Vec<String> = line
                .turns
                .into_iter()
                .filter(|t| !t.is_empty() && t.len() <= crate::protocol::MAX_BODY_BYTES)
                .collect();
            if !turns.is_empty() {
                dialogs.push(turns);
            }
        }
        if dialogs.is_empty() {
            bail!("{}: no dialogs", path.display());
        }
        let turns = dialogs.iter().map(Vec::len).sum();
        Ok(Dialogs { dialogs, path, turns })
    }
}

fn default_path() -> Option<PathBuf> {
    let here = PathBuf::from(DEFAULT_PATH);
    if here.is_file() {
        return Some(here);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_PATH);
    built.is_file().then_some(built)
}

/// One user's lines: the turns of one speaker (or of both), dialog after dialog, forever.
pub struct Script {
    dialogs: Arc<Dialogs>,
    /// Current dialog.
    d: usize,
    /// Next turn of the current dialog to look at.
    t: usize,
    /// `Some(s)`: only turns `i` with `i mod 2 == s`; `None`: every turn.
    speaker: Option<usize>,
}

impl Script {
    /// The script of `speaker` (0 or 1), or of both when `None`, starting at dialog `start`.
    pub fn new(dialogs: Arc<Dialogs>, start: usize, speaker: Option<usize>) -> Script {
        let d = start % dialogs.dialogs.len();
        Script { dialogs, d, t: 0, speaker }
    }

    /// The starting dialog of pair `p` of `pairs`: spread evenly over the file, so the pairs
    /// speak different languages.
    pub fn start_of(dialogs: &Dialogs, p: usize, pairs: usize) -> usize {
        (p * dialogs.dialogs.len()) / pairs.max(1)
    }

    /// The next line to send.
    pub fn next_turn(&mut self) -> String {
        let n = self.dialogs.dialogs.len();
        // At most one full pass: when no dialog has a turn for this speaker (all single-turn
        // dialogs and speaker 1), fall back to the first turn of the current dialog.
        for _ in 0..=n {
            let dl = &self.dialogs.dialogs[self.d];
            while self.t < dl.len() {
                let i = self.t;
                self.t += 1;
                if self.speaker.map_or(true, |s| i % 2 == s) {
                    return dl[i].clone();
                }
            }
            self.d = (self.d + 1) % n;
            self.t = 0;
        }
        self.dialogs.dialogs[self.d][0].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Arc<Dialogs> {
        let text = r#"{"lang":"english","topic":"t","turns":["a0","a1","a2"]}

{"turns":["b0","","b1"]}
{"turns":[]}
"#;
        Arc::new(Dialogs::parse(text, "x".into()).unwrap())
    }

    #[test]
    fn parse_drops_empty_turns_and_dialogs() {
        let d = sample();
        assert_eq!(d.dialogs.len(), 2);
        assert_eq!(d.dialogs[1], vec!["b0", "b1"]);
        assert_eq!(d.turns, 5);
    }

    #[test]
    fn speakers_alternate_turns_and_wrap() {
        let d = sample();
        let mut s0 = Script::new(d.clone(), 0, Some(0));
        let mut s1 = Script::new(d.clone(), 0, Some(1));
        let a: Vec<_> = (0..4).map(|_| s0.next_turn()).collect();
        let b: Vec<_> = (0..3).map(|_| s1.next_turn()).collect();
        assert_eq!(a, ["a0", "a2", "b0", "a0"]);
        assert_eq!(b, ["a1", "b1", "a1"]);
        let mut all = Script::new(d, 1, None);
        let c: Vec<_> = (0..3).map(|_| all.next_turn()).collect();
        assert_eq!(c, ["b0", "b1", "a0"]);
    }

    #[test]
    fn a_speaker_without_turns_still_gets_a_line() {
        let d = Arc::new(Dialogs::parse(r#"{"turns":["only"]}"#, "x".into()).unwrap());
        let mut s = Script::new(d, 0, Some(1));
        assert_eq!(s.next_turn(), "only");
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(Dialogs::parse("{\"x\":1}", "x".into()).is_err());
        assert!(Dialogs::parse("", "x".into()).is_err());
    }
}
