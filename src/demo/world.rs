//! The demo's synthetic language world (`../shared/docs/design.md` §4), generated from a
//! seed: short English-like review sentences over a few hundred words, some carrying
//! sentiment; a pretraining corpus, SFT pairs (`review of the garden:` → one sentence), and a
//! hidden **gold** reward that plays the human labeller.

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const TOPICS: &[&str] = &[
    "garden",
    "movie",
    "cafe",
    "hotel",
    "book",
    "concert",
    "museum",
    "train",
    "bakery",
    "park",
    "beach",
    "game",
    "phone",
    "bike",
    "kitchen",
    "market",
    "school",
    "river",
    "library",
    "festival",
    "restaurant",
    "shop",
    "bridge",
    "village",
    "castle",
    "theater",
    "camera",
    "album",
    "lesson",
    "trip",
];
const POSITIVE: &[&str] = &[
    "great",
    "lovely",
    "wonderful",
    "bright",
    "friendly",
    "delightful",
    "charming",
    "superb",
    "pleasant",
    "brilliant",
    "warm",
    "cheerful",
    "excellent",
    "fantastic",
    "beautiful",
    "calm",
    "gentle",
    "fresh",
    "tasty",
    "perfect",
];
const NEGATIVE: &[&str] = &[
    "awful", "boring", "dull", "gloomy", "rude", "terrible", "noisy", "dirty", "bland", "broken", "cold", "dreary",
    "horrible", "messy", "poor", "sad", "slow", "stale", "ugly", "weak",
];
const NEUTRAL: &[&str] = &[
    "big", "small", "old", "new", "long", "short", "quiet", "busy", "simple", "tall", "wide", "round", "plain",
    "local", "early", "late", "open", "full", "red", "green",
];
const NOUNS: &[&str] = &[
    "staff", "food", "music", "view", "room", "price", "story", "light", "service", "crowd", "path", "menu", "sound",
    "design", "window", "table", "garden", "street", "coffee", "bread", "painting", "seat", "door", "song", "ending",
];
const VERBS: &[&str] = &["was", "felt", "seemed", "looked", "stayed", "became"];
const ADVERBS: &[&str] = &["very", "quite", "rather", "really", "truly", "so"];
const OPENERS: &[&str] = &["i think", "honestly", "overall", "for me", "in short", "to be fair"];

/// A word's sentiment in the gold reward.
fn polarity(word: &str) -> i32 {
    if POSITIVE.contains(&word) {
        1
    } else if NEGATIVE.contains(&word) {
        -1
    } else {
        0
    }
}

/// Function words, which may repeat freely.
const FUNCTION_WORDS: &[&str] = &["the", "a", "and", "with", "but", "i", "for", "me", "in", "to", "be"];

/// Occurrences of content words after their first.
fn repeats(words: &[&str]) -> usize {
    let mut seen = std::collections::HashSet::new();
    words.iter().filter(|w| !FUNCTION_WORDS.contains(w) && !seen.insert(**w)).count()
}

/// The generator.
#[derive(Debug)]
pub struct World {
    rng: StdRng,
}

impl World {
    /// A world from `seed`.
    pub fn new(seed: u64) -> Self {
        World { rng: StdRng::seed_from_u64(seed) }
    }

    fn pick(&mut self, words: &[&'static str]) -> &'static str {
        words.choose(&mut self.rng).expect("non-empty word list")
    }

    /// An adjective with sentiment tilt `tilt` ∈ [−1, 1] (the chance of a positive vs a
    /// negative word; neutral words half the time).
    fn adjective(&mut self, tilt: f64) -> &'static str {
        if self.rng.gen_bool(0.5) {
            self.pick(NEUTRAL)
        } else if self.rng.gen_bool((0.5 + 0.5 * tilt).clamp(0.0, 1.0)) {
            self.pick(POSITIVE)
        } else {
            self.pick(NEGATIVE)
        }
    }

    /// One review sentence about `topic`, ending in a period.
    pub fn sentence(&mut self, topic: &str, tilt: f64) -> String {
        let n = self.pick(NOUNS);
        let s = match self.rng.gen_range(0..5) {
            0 => format!("the {topic} {} {} {}.", self.pick(VERBS), self.pick(ADVERBS), self.adjective(tilt)),
            1 => format!(
                "the {n} {} {} and the {topic} {} {}.",
                self.pick(VERBS),
                self.adjective(tilt),
                self.pick(VERBS),
                self.adjective(tilt)
            ),
            2 => format!("{}, the {topic} {} {}.", self.pick(OPENERS), self.pick(VERBS), self.adjective(tilt)),
            3 => format!("a {} {topic} with a {} {n}.", self.adjective(tilt), self.adjective(tilt)),
            _ => format!(
                "the {n} {} {} {}, but the {topic} {} {}.",
                self.pick(VERBS),
                self.pick(ADVERBS),
                self.adjective(tilt),
                self.pick(VERBS),
                self.adjective(tilt)
            ),
        };
        s
    }

    /// A random topic.
    pub fn topic(&mut self) -> &'static str {
        self.pick(TOPICS)
    }

    /// The pretraining corpus: `lines` reviews (prompt and sentence, one per line).
    pub fn corpus(&mut self, lines: usize) -> String {
        let mut out = String::new();
        for _ in 0..lines {
            let topic = self.topic();
            let tilt = self.rng.gen_range(-1.0..1.0);
            out.push_str(&format!("{} {}\n", prompt(topic), self.sentence(topic, tilt)));
        }
        out
    }

    /// SFT pairs `(prompt, response)`: the response is one sentence of any sentiment, with a
    /// leading space (the prompt ends in `:`).
    pub fn sft_pairs(&mut self, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                let topic = self.topic();
                let tilt = self.rng.gen_range(-1.0..1.0);
                (prompt(topic), format!(" {}", self.sentence(topic, tilt)))
            })
            .collect()
    }

    /// Prompts for RL and evaluation.
    pub fn prompts(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| prompt(self.topic())).collect()
    }
}

/// `review of the {topic}:`.
pub fn prompt(topic: &str) -> String {
    format!("review of the {topic}:")
}

/// The hidden gold reward of a response to `prompt` — what the imaginary people like:
///
/// ```text
/// gold = #distinct positive words − #distinct negative words   (at most 4 each)
///      + 1   if the sentence is grammatical (one of the world's sentence forms)
///      − 0.5 · repeats                                         (a content word said again)
///      − 0.2 · max(0, words − 14)                              (rambling)
/// ```
/// The SFT data is always grammatical and rarely repeats a word, so the reward model learns
/// little about either: the gap where a policy pushed far enough finds proxy reward the
/// people would not give. (`prompt` is unused: people judge the sentence alone.)
pub fn gold_reward(prompt: &str, response: &str) -> f32 {
    let _ = prompt;
    let text = response.trim();
    let words: Vec<&str> = text.trim_end_matches('.').split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let distinct: std::collections::HashSet<&str> = words.iter().copied().collect();
    let pos = distinct.iter().filter(|w| polarity(w) == 1).count().min(4) as f32;
    let neg = distinct.iter().filter(|w| polarity(w) == -1).count().min(4) as f32;
    let bonus = if grammatical(text) { 1.0 } else { 0.0 };
    pos - neg + bonus - 0.5 * repeats(&words) as f32 - 0.2 * (words.len() as f32 - 14.0).max(0.0)
}

/// The world's sentence forms (`T` topic, `N` noun, `V` verb, `D` adverb, `J` adjective,
/// `O` opener), as [`World::sentence`] writes them.
const FORMS: &[&[&str]] = &[
    &["the", "T", "V", "D", "J"],
    &["the", "N", "V", "J", "and", "the", "T", "V", "J"],
    &["O", ",", "the", "T", "V", "J"],
    &["a", "J", "T", "with", "a", "J", "N"],
    &["the", "N", "V", "D", "J", ",", "but", "the", "T", "V", "J"],
];

/// Whether `text` is exactly one sentence of one of the `FORMS`, ending in a period.
pub fn grammatical(text: &str) -> bool {
    let Some(body) = text.strip_suffix('.') else { return false };
    let spaced = body.replace(',', " , ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    FORMS.iter().any(|form| matches(form, &tokens))
}

fn matches(form: &[&str], tokens: &[&str]) -> bool {
    let Some((&sym, rest)) = form.split_first() else { return tokens.is_empty() };
    if sym == "O" {
        return OPENERS.iter().any(|o| {
            let ow: Vec<&str> = o.split(' ').collect();
            tokens.len() >= ow.len() && tokens[..ow.len()] == ow[..] && matches(rest, &tokens[ow.len()..])
        });
    }
    let Some((&tok, tail)) = tokens.split_first() else { return false };
    let ok = match sym {
        "T" => TOPICS.contains(&tok),
        "N" => NOUNS.contains(&tok),
        "V" => VERBS.contains(&tok),
        "D" => ADVERBS.contains(&tok),
        "J" => POSITIVE.contains(&tok) || NEGATIVE.contains(&tok) || NEUTRAL.contains(&tok),
        word => tok == word,
    };
    ok && matches(rest, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_is_deterministic_and_its_sentences_are_well_formed() {
        let (mut a, mut b) = (World::new(3), World::new(3));
        assert_eq!(a.corpus(20), b.corpus(20));
        for (p, r) in World::new(5).sft_pairs(200) {
            let g = gold_reward(&p, &r);
            assert!(g.is_finite());
            // every generated sentence is well formed: the bonus applies
            let words: Vec<&str> = r.trim().trim_end_matches('.').split([' ', ',']).filter(|w| !w.is_empty()).collect();
            assert!(grammatical(r.trim()), "{r}");
            let distinct: std::collections::HashSet<&str> = words.iter().copied().collect();
            let sentiment: i32 = distinct.iter().map(|w| polarity(w)).sum();
            let pos = distinct.iter().filter(|w| polarity(w) == 1).count().min(4) as i32;
            let neg = distinct.iter().filter(|w| polarity(w) == -1).count().min(4) as i32;
            assert_eq!(sentiment, pos - neg);
            let want = (pos - neg) as f32 + 1.0 - 0.5 * repeats(&words) as f32;
            assert!((g - want).abs() < 1e-6 || words.len() > 14, "{p} {r} {g}");
        }
    }

    #[test]
    fn gold_prefers_positive_grammatical_unrepeated_answers() {
        let p = "review of the cafe:";
        assert!(gold_reward(p, " the cafe was very lovely.") > gold_reward(p, " the cafe was very awful."));
        assert!(gold_reward(p, " the cafe was very lovely.") > gold_reward(p, " the cafe was very lovely"));
        assert!(gold_reward(p, " the cafe was very lovely.") > gold_reward(p, " the cafe was very lovely. zzz."));
        assert!(
            gold_reward(p, " a lovely cafe with a bright garden.")
                > gold_reward(p, " a lovely cafe with a lovely cafe.")
        );
        // a pile of praise that is no sentence of the world
        assert!(!grammatical("a bright castle with a bright with a bright garden."));
        assert!(
            gold_reward(p, " a bright castle with a bright with a bright garden.")
                < gold_reward(p, " the cafe was very lovely.")
        );
        assert!(grammatical("to be fair, the cafe seemed awful."));
    }
}
