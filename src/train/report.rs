//! What training runs recorded, read back from their `metrics.jsonl`: the
//! per-epoch table of `moevqa report` (train and val accuracy, val accuracy
//! per question type, and for Sort-of-CLEVR the relational and
//! non-relational means of issue 3's goal), and the lines `plot` draws.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::TrainError;
use super::run::{RunPaths, io_err};
use crate::data::sort_of_clevr;
use crate::models::relation_network::DeadUnits;

/// The epochs a run recorded, in file order.
#[derive(Debug, Clone)]
pub struct RunMetrics {
    /// The run directory's name.
    pub name: String,
    /// k from the run's config.json, when it has one.
    pub k: Option<u64>,
    /// (epoch, the whole metrics line).
    pub lines: Vec<(u64, Value)>,
}

impl RunMetrics {
    /// Reads `RUN/metrics.jsonl`; a malformed line or a line without a
    /// numeric "epoch" is an error naming the file and line, and so is a file
    /// with no epoch yet.
    pub fn read(run: &Path) -> Result<Self, TrainError> {
        let paths = RunPaths::new(run);
        let text =
            std::fs::read_to_string(&paths.metrics).map_err(|e| io_err(&paths.metrics, e))?;
        let mut lines = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let at = |what: String| {
                TrainError::Input(format!(
                    "{} line {}: {what}",
                    paths.metrics.display(),
                    i + 1
                ))
            };
            let v: Value =
                serde_json::from_str(line).map_err(|e| at(format!("not a metrics line ({e})")))?;
            let epoch = v["epoch"]
                .as_u64()
                .ok_or_else(|| at("expected a whole number in \"epoch\"".into()))?;
            lines.push((epoch, v));
        }
        if lines.is_empty() {
            return Err(TrainError::Input(format!(
                "{}: no epoch recorded yet",
                paths.metrics.display()
            )));
        }
        let name = run
            .file_name()
            .map_or_else(|| run.display().to_string(), |n| n.to_string_lossy().into());
        // A missing or foreign config only costs the label its k.
        let k = std::fs::read_to_string(&paths.config)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|c| c["k"].as_u64());
        Ok(RunMetrics { name, k, lines })
    }

    /// The epoch with the best validation accuracy (the first of equals)
    /// and that accuracy; None when no epoch was validated.
    pub fn best(&self) -> Option<(u64, f64)> {
        self.lines
            .iter()
            .filter_map(|(epoch, v)| Some((*epoch, val_of(v)?)))
            .fold(None, |best, (e, a)| match best {
                Some((_, b)) if b >= a => best,
                _ => Some((e, a)),
            })
    }

    /// "name (k = K)", or the name alone.
    pub fn label(&self) -> String {
        match self.k {
            Some(k) => format!("{} (k = {k})", self.name),
            None => self.name.clone(),
        }
    }

    /// One row per recorded epoch.
    pub fn rows(&self) -> Vec<EpochRow> {
        self.lines
            .iter()
            .map(|(epoch, v)| {
                let families: BTreeMap<String, f64> = families_of(v)
                    .into_iter()
                    .flatten()
                    .filter_map(|(f, a)| Some((f.clone(), a.as_f64()?)))
                    .collect();
                let groups = sort_of_clevr::group_means(&families);
                EpochRow {
                    run: self.name.clone(),
                    k: self.k,
                    epoch: *epoch,
                    train: train_of(v),
                    val: val_of(v),
                    non_relational: groups.map(|g| g.0),
                    relational: groups.map(|g| g.1),
                    families,
                    dead_units: serde_json::from_value(v["val"]["dead_units"].clone()).ok(),
                }
            })
            .collect()
    }
}

/// One epoch of one run, as `moevqa report --json` prints it (percent).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochRow {
    pub run: String,
    pub k: Option<u64>,
    pub epoch: u64,
    /// Training accuracy (CLEVR) or soft score (VQA v2).
    pub train: Option<f64>,
    /// Validation accuracy; absent for an epoch without validation.
    pub val: Option<f64>,
    /// Sort-of-CLEVR only: the mean over its three non-relational types.
    pub non_relational: Option<f64>,
    /// Sort-of-CLEVR only: the mean over its three relational types.
    pub relational: Option<f64>,
    /// Validation accuracy per question family (CLEVR) or answer type (VQA).
    pub families: BTreeMap<String, f64>,
    /// The Relation Network's dead-unit probe on val, where recorded.
    pub dead_units: Option<DeadUnits>,
}

/// A metrics line's training accuracy (CLEVR) or soft score (VQA v2).
pub(crate) fn train_of(line: &Value) -> Option<f64> {
    line["train_accuracy"]
        .as_f64()
        .or_else(|| line["train_score"].as_f64())
}

/// A metrics line's validation accuracy: CLEVR's `val.accuracy` or VQA's
/// official score, `val.score.overall`.
pub(crate) fn val_of(line: &Value) -> Option<f64> {
    let val = &line["val"];
    val["accuracy"]
        .as_f64()
        .or_else(|| val["score"]["overall"].as_f64())
}

/// A metrics line's validation accuracy per question type: CLEVR's
/// `val.by_family` or VQA's `val.score.per_answer_type`.
pub(crate) fn families_of(line: &Value) -> Option<&serde_json::Map<String, Value>> {
    let val = &line["val"];
    val["by_family"]
        .as_object()
        .or_else(|| val["score"]["per_answer_type"].as_object())
}

/// The rows as a Markdown table: run, k, epoch, train, val, the
/// Sort-of-CLEVR group means when any row has them, one column per
/// question type (Sort-of-CLEVR's in its own order, others alphabetical),
/// and the dead share of g's last layer when any row recorded it.
pub fn markdown(rows: &[EpochRow]) -> String {
    let groups = rows.iter().any(|r| r.relational.is_some());
    let dead_g = |r: &EpochRow| {
        r.dead_units
            .as_ref()
            .and_then(|d| d.g.last().map(|x| 100.0 * x))
    };
    let dead = rows.iter().any(|r| dead_g(r).is_some());
    let mut families: Vec<&String> = Vec::new();
    for r in rows {
        for f in r.families.keys() {
            if !families.contains(&f) {
                families.push(f);
            }
        }
    }
    let order = |f: &str| {
        sort_of_clevr::QUESTION_TYPES
            .iter()
            .position(|t| *t == f)
            .unwrap_or(usize::MAX)
    };
    families.sort_by(|a, b| order(a).cmp(&order(b)).then(a.cmp(b)));
    let mut head = vec!["run", "k", "epoch", "train %", "val %"];
    if groups {
        head.extend(["non-relational %", "relational %"]);
    }
    head.extend(families.iter().map(|f| f.as_str()));
    if dead {
        head.push("g last layer dead %");
    }
    let cell = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in rows {
        let mut c = vec![
            r.run.clone(),
            r.k.map_or_else(|| "-".into(), |k| k.to_string()),
            r.epoch.to_string(),
            cell(r.train),
            cell(r.val),
        ];
        if groups {
            c.extend([cell(r.non_relational), cell(r.relational)]);
        }
        c.extend(families.iter().map(|f| cell(r.families.get(*f).copied())));
        if dead {
            c.push(cell(dead_g(r)));
        }
        out.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A run directory with these metrics lines and k = 6 (plot's tests too).
    pub(crate) fn run_dir(name: &str, lines: &[&str]) -> std::path::PathBuf {
        let dir = std::env::temp_dir()
            .join(format!("moevqa-metrics-{}", std::process::id()))
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"k": 6}"#).unwrap();
        dir
    }

    #[test]
    fn the_best_epoch_is_the_first_with_the_highest_val() {
        let line = |e: u64, val: &str| format!(r#"{{"epoch": {e}, "val": {val}}}"#);
        let clevr = |accs: &[f64]| -> Vec<String> {
            (1..)
                .zip(accs)
                .map(|(e, a)| line(e, &format!(r#"{{"accuracy": {a}}}"#)))
                .collect()
        };
        let best = |name: &str, lines: &[String]| {
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            RunMetrics::read(&run_dir(name, &refs)).unwrap().best()
        };
        assert_eq!(best("b1", &clevr(&[50.0, 60.0, 55.0])), Some((2, 60.0)));
        assert_eq!(best("b2", &clevr(&[50.0, 50.0])), Some((1, 50.0)));
        assert_eq!(best("b3", &clevr(&[40.0, 45.0, 70.5])), Some((3, 70.5)));
        // VQA's official score; an epoch without validation does not count.
        let vqa = [
            line(1, r#"{"score": {"overall": 31.5}}"#),
            line(2, r#"{"score": {"overall": 33.25}}"#),
            line(3, "null"),
        ];
        assert_eq!(best("b4", &vqa), Some((2, 33.25)));
        assert_eq!(best("b5", &[line(1, "null")]), None);
    }

    #[test]
    fn sort_of_clevr_rows_carry_the_group_means() {
        let dir = run_dir(
            "soc-k6",
            &[
                r#"{"epoch":1,"train_accuracy":40.0,"val":{"accuracy":50.0,"by_family":{"query_shape":90.0,"is_left":60.0,"is_top":30.0,"closest_shape":70.0,"furthest_shape":40.0,"count_same_shape":10.0}}}"#,
                r#"{"epoch":2,"train_accuracy":45.0,"val":null}"#,
            ],
        );
        let rows = RunMetrics::read(&dir).unwrap().rows();
        assert_eq!(rows.len(), 2);
        // (90 + 60 + 30) / 3 and (70 + 40 + 10) / 3, by hand.
        assert_eq!(rows[0].non_relational, Some(60.0));
        assert_eq!(rows[0].relational, Some(40.0));
        assert_eq!(
            (rows[0].k, rows[0].train, rows[0].val),
            (Some(6), Some(40.0), Some(50.0))
        );
        assert_eq!((rows[1].val, rows[1].relational), (None, None));
        let md = markdown(&rows[..1]);
        let lines: Vec<_> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| run | k | epoch | train % | val % | non-relational % | relational % | query_shape | is_left | is_top | closest_shape | furthest_shape | count_same_shape |"
        );
        assert_eq!(lines[1].matches("---|").count(), 13);
        assert_eq!(
            lines[2],
            "| soc-k6 | 6 | 1 | 40.00 | 50.00 | 60.00 | 40.00 | 90.00 | 60.00 | 30.00 | 70.00 | 40.00 | 10.00 |"
        );
        // A val-less epoch among the rows reads "-" in every val column.
        let md = markdown(&rows);
        assert!(md.contains("| relational % |"), "{md}");
        assert!(
            md.contains("| soc-k6 | 6 | 2 | 45.00 | - | - | - | - | - | - | - | - | - |"),
            "{md}"
        );
    }

    #[test]
    fn other_families_sort_by_name_and_vqa_reads_its_score() {
        let clevr = run_dir(
            "c",
            &[
                r#"{"epoch":1,"train_accuracy":40.0,"val":{"accuracy":45.5,"by_family":{"exist":60.0,"count":30.0},"dead_units":{"questions":128,"g":[0.0,0.25],"f":[0.5,0.5]}}}"#,
            ],
        );
        let vqa = run_dir(
            "v",
            &[
                r#"{"epoch":3,"train_score":30.0,"val":{"k":6,"score":{"overall":31.4,"per_answer_type":{"yes/no":59.7},"per_question_type":{"is the":60.0},"questions":8}}}"#,
            ],
        );
        let mut rows = RunMetrics::read(&clevr).unwrap().rows();
        rows.extend(RunMetrics::read(&vqa).unwrap().rows());
        assert_eq!(rows[0].relational, None);
        assert_eq!((rows[1].train, rows[1].val), (Some(30.0), Some(31.4)));
        assert_eq!(rows[0].dead_units.as_ref().unwrap().g, vec![0.0, 0.25]);
        assert_eq!(rows[1].dead_units, None);
        let md = markdown(&rows);
        assert!(
            md.starts_with(
                "| run | k | epoch | train % | val % | count | exist | yes/no | g last layer dead % |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| c | 6 | 1 | 40.00 | 45.50 | 30.00 | 60.00 | - | 25.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| v | 6 | 3 | 30.00 | 31.40 | - | - | 59.70 | - |"),
            "{md}"
        );
    }

    #[test]
    fn bad_metrics_files_name_the_file_and_line() {
        let good = r#"{"epoch":1,"val":{}}"#;
        let bad = run_dir("bad", &[good, "{not json"]);
        let e = RunMetrics::read(&bad).unwrap_err().to_string();
        assert!(
            e.contains("metrics.jsonl line 2: not a metrics line"),
            "{e}"
        );
        let no_epoch = run_dir("no-epoch", &[r#"{"epoch":1.5,"val":{}}"#]);
        let e = RunMetrics::read(&no_epoch).unwrap_err().to_string();
        assert!(
            e.contains("line 1: expected a whole number in \"epoch\""),
            "{e}"
        );
        let empty = run_dir("empty", &[]);
        let e = RunMetrics::read(&empty).unwrap_err().to_string();
        assert!(e.contains("no epoch recorded yet"), "{e}");
        let e = RunMetrics::read(&bad.join("nowhere"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere/metrics.jsonl"), "{e}");
    }
}
