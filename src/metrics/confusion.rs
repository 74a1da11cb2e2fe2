//! Which answer a model gave for each right answer, per question type: the
//! error analysis behind an accuracy figure (`moevqa eval --confusion`).
//!
//! A per-type accuracy says how often a type is answered wrongly; the
//! confusion says how. On Sort-of-CLEVR, for example, a model that counts
//! the objects of the commoner shape instead of those shaped like the asked
//! object answers "5" to every "1" and "4" to every "2", which reads as a
//! flat 80% in the accuracy table.

use std::collections::BTreeMap;

/// Per question type, per right answer, how many questions drew each given
/// answer (`confusion[type][right][given]`).
pub type Confusion = BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>;

/// Counts `(question type, right answer, given answer)` rows.
pub fn count<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Confusion {
    let mut c = Confusion::new();
    for (family, right, given) in rows {
        *c.entry(family.to_string())
            .or_default()
            .entry(right.to_string())
            .or_default()
            .entry(given.to_string())
            .or_default() += 1;
    }
    c
}

/// One kind of wrong answer of a question type.
#[derive(Debug, Clone, PartialEq)]
pub struct Mistake {
    pub right: String,
    pub given: String,
    /// Questions with this right answer that drew this given answer.
    pub count: u64,
    /// Questions of the type with this right answer.
    pub of: u64,
}

/// The `per_type` most frequent mistakes of each type that has any, most
/// frequent first (ties: by right answer, then given answer).
pub fn top_mistakes(c: &Confusion, per_type: usize) -> BTreeMap<String, Vec<Mistake>> {
    let mut out = BTreeMap::new();
    for (family, by_right) in c {
        let mut wrong: Vec<Mistake> = by_right
            .iter()
            .flat_map(|(right, given)| {
                let of = given.values().sum();
                given
                    .iter()
                    .filter(move |(g, _)| *g != right)
                    .map(move |(g, &count)| Mistake {
                        right: right.clone(),
                        given: g.clone(),
                        count,
                        of,
                    })
            })
            .collect();
        if wrong.is_empty() {
            continue;
        }
        // A stable sort keeps the map's (right, given) order among ties.
        wrong.sort_by_key(|m| std::cmp::Reverse(m.count));
        wrong.truncate(per_type);
        out.insert(family.clone(), wrong);
    }
    out
}

/// A question type's commonest right answer: what a model that knows only
/// the type would answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Majority {
    pub answer: String,
    /// Percent of the type's questions with that right answer.
    pub accuracy: f64,
}

/// The baseline beside a per-type accuracy table: each type's [`Majority`],
/// and the accuracy over all questions of answering each type's commonest
/// answer (ties: the first answer in order).
pub fn majority(c: &Confusion) -> (BTreeMap<String, Majority>, f64) {
    let mut by_type = BTreeMap::new();
    let (mut hits, mut total) = (0u64, 0u64);
    for (family, by_right) in c {
        let counts: Vec<(&String, u64)> = by_right
            .iter()
            .map(|(right, given)| (right, given.values().sum()))
            .collect();
        // max_by_key keeps the last of equal maxima: reversed, the first.
        let Some(&(answer, m)) = counts.iter().rev().max_by_key(|c| c.1) else {
            continue;
        };
        let n: u64 = counts.iter().map(|c| c.1).sum();
        hits += m;
        total += n;
        by_type.insert(
            family.clone(),
            Majority {
                answer: answer.clone(),
                accuracy: 100.0 * m as f64 / n as f64,
            },
        );
    }
    let overall = if total == 0 {
        0.0
    } else {
        100.0 * hits as f64 / total as f64
    };
    (by_type, overall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Confusion {
        count([
            ("count", "1", "5"),
            ("count", "1", "5"),
            ("count", "1", "1"),
            ("count", "2", "4"),
            ("count", "3", "3"),
            ("shape", "circle", "circle"),
            ("shape", "square", "square"),
        ])
    }

    #[test]
    fn counts_each_right_and_given_answer_per_type() {
        let c = sample();
        assert_eq!(c["count"]["1"]["5"], 2);
        assert_eq!(c["count"]["1"]["1"], 1);
        assert_eq!(c["count"]["2"]["4"], 1);
        assert_eq!(c["count"]["3"].len(), 1);
        assert_eq!(c["shape"].len(), 2);
        // Every row lands once.
        let total: u64 = c
            .values()
            .flat_map(|r| r.values())
            .flat_map(|g| g.values())
            .sum();
        assert_eq!(total, 7);
    }

    #[test]
    fn top_mistakes_leave_out_right_answers_and_sort_by_count() {
        let m = top_mistakes(&sample(), 5);
        // "shape" has no mistakes, so no entry.
        assert_eq!(m.keys().collect::<Vec<_>>(), ["count"]);
        let want = [
            Mistake {
                right: "1".into(),
                given: "5".into(),
                count: 2,
                of: 3,
            },
            Mistake {
                right: "2".into(),
                given: "4".into(),
                count: 1,
                of: 1,
            },
        ];
        assert_eq!(m["count"], want);
        // Truncated to the most frequent.
        assert_eq!(top_mistakes(&sample(), 1)["count"], want[..1]);
    }

    #[test]
    fn majority_is_each_types_commonest_right_answer() {
        let (by_type, overall) = majority(&sample());
        // count: right answers 1, 1, 1, 2, 3 -> "1" in 3 of 5.
        assert_eq!(by_type["count"].answer, "1");
        assert!((by_type["count"].accuracy - 60.0).abs() < 1e-9);
        // shape: circle 1, square 1: the tie goes to the first.
        assert_eq!(by_type["shape"].answer, "circle");
        assert!((by_type["shape"].accuracy - 50.0).abs() < 1e-9);
        // (3 + 1) of 7 questions.
        assert!((overall - 400.0 / 7.0).abs() < 1e-9);
        let (none, zero) = majority(&Confusion::new());
        assert!(none.is_empty());
        assert_eq!(zero, 0.0);
    }

    #[test]
    fn ties_keep_the_order_of_the_right_answer() {
        let c = count([("t", "b", "x"), ("t", "a", "y"), ("t", "a", "z")]);
        let m = top_mistakes(&c, 3);
        let order: Vec<(&str, &str)> = m["t"]
            .iter()
            .map(|x| (x.right.as_str(), x.given.as_str()))
            .collect();
        assert_eq!(order, [("a", "y"), ("a", "z"), ("b", "x")]);
    }
}
