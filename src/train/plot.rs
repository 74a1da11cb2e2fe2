//! Learning curves of training runs as a PNG (plotters): the validation and
//! training accuracy per epoch of each run, read from its `metrics.jsonl`
//! (either kind of run: CLEVR accuracy or the VQA soft score), or with
//! `families` one validation line per question type (CLEVR `by_family`,
//! VQA `per_answer_type`).
//!
//! [`draw_expert_usage`] draws which experts each question type chose, a
//! panel per block.
//!
//! [`draw_sweep`] draws an `eval` sweep over k: accuracy against the CNN's
//! MACs and against its measured time per image, a point per k, so the
//! cost of each k (the paper's Tables 1 and 2 trade-off) is seen at once.
//!
//! The text is drawn with DejaVu Sans, built into the binary
//! (`assets/DejaVuSans.ttf`, Bitstream Vera licence in
//! `assets/DejaVuSans.LICENSE`), so plotting needs no system fonts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use serde_json::Value;

use super::TrainError;
use super::report::{RunMetrics, families_of, train_of, val_of};
use super::run::io_err;
use crate::moe::usage::Usage;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Colours that read on white, cycled: matplotlib's "tab10", then the
/// light halves of "tab20" (clevr-2d has 13 question families).
const COLORS: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (174, 199, 232),
    (255, 152, 150),
    (152, 223, 138),
    (197, 176, 213),
    (255, 187, 120),
    (158, 218, 229),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
];

fn color(i: usize) -> RGBColor {
    let (r, g, b) = COLORS[i % COLORS.len()];
    RGBColor(r, g, b)
}

/// One line of a plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub label: String,
    /// (epoch, percent), in epoch order.
    pub points: Vec<(f64, f64)>,
    /// Colour index: a run's training curve shares its validation colour.
    pub color: usize,
    /// A training curve, drawn thin beside its validation curve.
    pub train: bool,
}

/// The curves of `run` (a run directory), coloured from `color`: its
/// validation and training accuracy, or with `families` its validation
/// accuracy per question type. Labels start with the directory's name and k.
pub fn run_curves(run: &Path, families: bool, color: usize) -> Result<Vec<Curve>, TrainError> {
    let m = RunMetrics::read(run)?;
    let (name, lines) = (m.label(), &m.lines);
    let series = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        lines
            .iter()
            .filter_map(|(e, v)| f(v).map(|y| (*e as f64, y)))
            .collect()
    };
    if !families {
        let val = series(&val_of);
        let train = series(&train_of);
        let curve = |label: String, points, train| Curve {
            label,
            points,
            color,
            train,
        };
        return Ok([
            curve(format!("{name} val"), val, false),
            curve(format!("{name} train"), train, true),
        ]
        .into_iter()
        .filter(|c| !c.points.is_empty())
        .collect());
    }
    let mut names = std::collections::BTreeSet::new();
    for (_, v) in lines {
        names.extend(families_of(v).into_iter().flat_map(|m| m.keys().cloned()));
    }
    Ok(names
        .iter()
        .enumerate()
        .map(|(i, fam)| Curve {
            label: format!("{name} {fam}"),
            points: series(&|v| families_of(v)?.get(fam)?.as_f64()),
            color: color + i,
            train: false,
        })
        .collect())
}

fn register_font() -> Result<(), TrainError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(TrainError::Input(
            "the built-in font (assets/DejaVuSans.ttf) does not parse".into(),
        ))
    }
}

/// Draws `curves` (percent against epoch, 0-100) into the PNG `out`, 1000x600.
pub fn draw(curves: &[Curve], title: &str, out: &Path) -> Result<(), TrainError> {
    register_font()?;
    let fail = |e: &dyn std::fmt::Display| io_err(out, e);
    let last = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    // A strip right of the last epoch, with no data in it, holds the legend:
    // about 7.5 px a character of its longest label on a ~900 px wide plot.
    let longest = curves.iter().map(|c| c.label.chars().count()).max();
    let share = ((7.5 * longest.unwrap_or(0) as f64 + 60.0) / 900.0).min(0.6);
    let strip = (last * share / (1.0 - share)).max(0.5);
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5f64..last + 0.5 + strip, 0f64..100f64)
        .map_err(|e| fail(&e))?;
    // Whole epochs only on the x axis.
    let ticks = ((last + strip) as usize + 1).min(30);
    chart
        .configure_mesh()
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_desc("epoch")
        .y_desc("accuracy (%)")
        .x_labels(ticks + 1)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 && *x >= 1.0 && *x <= last {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| fail(&e))?;
    for c in curves {
        let color = color(c.color);
        let width = if c.train { 1 } else { 2 };
        let style = color.stroke_width(width);
        chart
            .draw_series(LineSeries::new(c.points.iter().copied(), style))
            .map_err(|e| fail(&e))?
            .label(c.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        if !c.train {
            chart
                .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| fail(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// One k of an `eval` sweep (CLEVR or VQA run).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRow {
    pub k: usize,
    pub cnn_macs: u64,
    /// Measured on the fast CPU engine; None on Burn's ops.
    pub cnn_ms_per_image: Option<f64>,
    /// Percent (the official VQA accuracy on a VQA run; None without
    /// annotations).
    pub accuracy: Option<f64>,
    pub questions_per_s: f64,
    /// Expert usage per question type (VQA: answer type), for
    /// [`draw_expert_usage`].
    pub usage_by_group: BTreeMap<String, Usage>,
}

/// A padded axis range over `v` (at least `min_span` wide), clamped to
/// `lo..hi` where given.
fn span(v: impl Iterator<Item = f64>, min_span: f64, lo: f64, hi: f64) -> std::ops::Range<f64> {
    let (a, b) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let mid = (a + b) / 2.0;
    let half = ((b - a) / 2.0).max(min_span / 2.0) * 1.25;
    (mid - half).max(lo)..(mid + half).min(hi)
}

/// Draws `rows` (an `eval` sweep) into the PNG `out`, 1200x500: accuracy
/// against CNN MACs per image (left) and against the measured CNN time
/// per image (right, or a note where the engine did not measure it), each
/// point labelled with its k. Rows without an accuracy (a VQA split
/// without annotations) cannot be drawn: an error says so.
pub fn draw_sweep(rows: &[SweepRow], title: &str, out: &Path) -> Result<(), TrainError> {
    let pts: Vec<(usize, f64, Option<f64>, f64)> = rows
        .iter()
        .filter_map(|r| {
            let acc = r.accuracy?;
            Some((r.k, r.cnn_macs as f64 / 1e6, r.cnn_ms_per_image, acc))
        })
        .collect();
    if pts.is_empty() {
        return Err(TrainError::Input(format!(
            "{}: no accuracy to plot (the split has no answers)",
            out.display()
        )));
    }
    register_font()?;
    let fail = |e: &dyn std::fmt::Display| io_err(out, e);
    let root = BitMapBackend::new(out, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| fail(&e))?;
    let (left, right) = root.split_horizontally(600);
    let y = span(pts.iter().map(|p| p.3), 4.0, 0.0, 100.0);
    let timed: Vec<(usize, f64, f64)> = pts
        .iter()
        .filter_map(|&(k, _, ms, acc)| Some((k, ms?, acc)))
        .collect();
    // (k, x, accuracy) per panel.
    type Points = Vec<(usize, f64, f64)>;
    let panels: [(&DrawingArea<_, _>, &str, Points); 2] = [
        (
            &left,
            "CNN MACs per image (millions)",
            pts.iter().map(|&(k, m, _, a)| (k, m, a)).collect(),
        ),
        (&right, "CNN ms per image (measured)", timed),
    ];
    for (i, (area, x_desc, mut p)) in panels.into_iter().enumerate() {
        if p.is_empty() {
            area.draw(&Text::new(
                "CNN time not measured (only the fast CPU engine measures it)",
                (40, 220),
                ("sans-serif", 16),
            ))
            .map_err(|e| fail(&e))?;
            continue;
        }
        // The line goes from the largest k down, so a timing that does not
        // fall with k shows as the line turning back.
        p.sort_by_key(|q| std::cmp::Reverse(q.0));
        // From 0, so the ratio between two k reads off the axis.
        let x_max = p.iter().map(|q| q.1).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max.max(1e-9), y.clone())
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("accuracy (%)")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| fail(&e))?;
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                p.iter().map(|q| (q.1, q.2)),
                c.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(p.iter().map(|q| {
                EmptyElement::at((q.1, q.2))
                    + Circle::new((0, 0), 4, c.filled())
                    + Text::new(format!("k = {}", q.0), (6, -18), ("sans-serif", 14))
            }))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

/// The shade of a share in [0, 1]: white to the first colour.
fn shade(share: f64) -> RGBColor {
    let (r, g, b) = COLORS[0];
    let mix = |c: u8| (255.0 - share.clamp(0.0, 1.0) * (255.0 - c as f64)).round() as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

/// Draws which experts each group of questions (CLEVR question type, VQA
/// answer type) chose at `k`: a panel per block, three to a row, a row per
/// group, a column per expert, the cell shaded by the share of the group's
/// questions that chose that expert (white 0, blue 1). `by_group` is
/// `expert_usage_per_family` (or `_per_answer_type`) of an evaluation.
pub fn draw_expert_usage(
    by_group: &BTreeMap<String, Usage>,
    k: usize,
    title: &str,
    out: &Path,
) -> Result<(), TrainError> {
    let groups: Vec<(&String, &Usage)> = by_group
        .iter()
        .filter(|(_, u)| u.iter().flatten().any(|&c| c > 0))
        .collect();
    let blocks = groups.iter().map(|(_, u)| u.len()).max().unwrap_or(0);
    if blocks == 0 || k == 0 {
        return Err(TrainError::Input(format!(
            "{}: no expert usage to plot (no question was evaluated)",
            out.display()
        )));
    }
    register_font()?;
    let fail = |e: &dyn std::fmt::Display| io_err(out, e);
    let cols = blocks.min(3);
    let rows = blocks.div_ceil(cols);
    let panel = (70 + 24 * groups.len()) as u32;
    let root = BitMapBackend::new(out, (1200, 50 + rows as u32 * panel)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(&e))?;
    let names: Vec<&str> = groups.iter().map(|(n, _)| n.as_str()).collect();
    let label_w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32 * 8 + 12;
    for (b, area) in root
        .split_evenly((rows, cols))
        .iter()
        .enumerate()
        .take(blocks)
    {
        let paths = groups
            .iter()
            .filter_map(|(_, u)| u.get(b))
            .map(Vec::len)
            .max();
        let paths = paths.unwrap_or(0) as i32;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("block {}", b + 1), ("sans-serif", 15))
            .margin(6)
            .x_label_area_size(26)
            .y_label_area_size(label_w)
            // A segmented a..b has a segment for each of a..=b.
            .build_cartesian_2d(
                (0..paths - 1).into_segmented(),
                (0..groups.len() as i32 - 1).into_segmented(),
            )
            .map_err(|e| fail(&e))?;
        let label = |v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) => Some(*i),
            _ => None,
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(paths as usize)
            .y_labels(groups.len())
            .x_label_formatter(&|v| label(v).map_or(String::new(), |i| i.to_string()))
            .y_label_formatter(&|v| {
                label(v)
                    .and_then(|i| names.get(i as usize))
                    .map_or(String::new(), |n| n.to_string())
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| fail(&e))?;
        let cells = groups.iter().enumerate().flat_map(|(g, (_, u))| {
            let row = u.get(b).map_or(&[][..], Vec::as_slice);
            // Each question chose k experts in each block.
            let questions =
                (u.first().map_or(0, |r| r.iter().sum::<u64>()) as f64 / k as f64).max(1.0);
            row.iter().enumerate().map(move |(e, &c)| {
                let (e, g) = (e as i32, g as i32);
                Rectangle::new(
                    [
                        (SegmentValue::Exact(e), SegmentValue::Exact(g)),
                        (SegmentValue::Exact(e + 1), SegmentValue::Exact(g + 1)),
                    ],
                    shade(c as f64 / questions).filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::report::tests::run_dir;

    const CLEVR: [&str; 2] = [
        r#"{"epoch":1,"train_accuracy":40.0,"val":{"accuracy":45.5,"by_family":{"count":30.0,"exist":60.0}}}"#,
        r#"{"epoch":2,"train_accuracy":50.0,"val":{"accuracy":55.0,"by_family":{"count":35.0,"exist":75.0}}}"#,
    ];

    #[test]
    fn curves_read_val_train_and_families() {
        let dir = run_dir("soc-k6", &CLEVR);
        let c = run_curves(&dir, false, 3).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].label, "soc-k6 (k = 6) val");
        assert_eq!(c[0].points, vec![(1.0, 45.5), (2.0, 55.0)]);
        assert_eq!((c[0].color, c[0].train), (3, false));
        assert_eq!(c[1].points, vec![(1.0, 40.0), (2.0, 50.0)]);
        assert!(c[1].train && c[1].color == 3);
        let f = run_curves(&dir, true, 0).unwrap();
        let got: Vec<_> = f
            .iter()
            .map(|c| (c.label.as_str(), c.points.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("soc-k6 (k = 6) count", vec![(1.0, 30.0), (2.0, 35.0)]),
                ("soc-k6 (k = 6) exist", vec![(1.0, 60.0), (2.0, 75.0)]),
            ]
        );
        // A VQA run: train_score, per_answer_type, a val-less epoch skipped.
        let vqa = run_dir(
            "vqa",
            &[
                r#"{"epoch":1,"train_score":20.0,"val":null}"#,
                r#"{"epoch":2,"train_score":30.0,"val":{"k":6,"score":{"overall":31.4,"per_answer_type":{"yes/no":59.7},"per_question_type":{},"questions":8}}}"#,
            ],
        );
        let c = run_curves(&vqa, false, 0).unwrap();
        assert_eq!(c[0].points, vec![(2.0, 31.4)]);
        assert_eq!(c[1].points, vec![(1.0, 20.0), (2.0, 30.0)]);
        let f = run_curves(&vqa, true, 0).unwrap();
        assert_eq!(f[0].label, "vqa (k = 6) yes/no");
        assert_eq!(f[0].points, vec![(2.0, 59.7)]);
    }

    #[test]
    fn draw_writes_a_png_with_the_curves() {
        let dir = run_dir("draw", &CLEVR);
        let curves = run_curves(&dir, false, 0).unwrap();
        let out = dir.join("curves.png");
        draw(&curves, "Sort-of-CLEVR", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1000, 600));
        // The validation curve's colour is on the image, the text is dark.
        let RGBColor(r, g, b) = color(0);
        assert!(img.pixels().any(|p| p.0 == [r, g, b]));
        assert!(img.pixels().filter(|p| p.0.iter().all(|&c| c < 60)).count() > 500);
        // An unwritable destination is an error naming it.
        let e = draw(&curves, "t", &dir.join("no/such/dir/x.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.png"), "{e}");
    }

    #[test]
    fn draw_expert_usage_shades_each_group_and_block() {
        let dir = run_dir("experts", &CLEVR);
        // k = 2 over 4 experts: "a" (10 questions) always picks 0 and 1 in
        // block 1; "b" (4 questions) splits its picks in both blocks.
        let by: BTreeMap<String, Usage> = [
            ("a".to_string(), vec![vec![10, 10, 0, 0], vec![5, 5, 5, 5]]),
            ("b".to_string(), vec![vec![2, 2, 2, 2], vec![0, 4, 4, 0]]),
        ]
        .into_iter()
        .collect();
        let out = dir.join("experts.png");
        draw_expert_usage(&by, 2, "experts", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.width(), 1200);
        let count = |c: RGBColor| img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        // Share 1 (a's two experts in block 1, b's two in block 2) and
        // share 0.5 (a in block 2, b in block 1) are both drawn.
        let (full, half) = (count(shade(1.0)), count(shade(0.5)));
        assert!(full > 200 && half > 200, "{full} {half}");
        assert_eq!(shade(1.0), color(0));
        assert_eq!(shade(0.0), WHITE);
        // Nothing evaluated: an error naming the file, no file.
        let empty = dir.join("empty.png");
        let e = draw_expert_usage(&BTreeMap::new(), 2, "t", &empty)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("empty.png") && e.contains("no expert usage"),
            "{e}"
        );
        assert!(!empty.exists());
    }

    #[test]
    fn draw_sweep_plots_each_k_against_macs_and_time() {
        let dir = run_dir("sweep", &CLEVR);
        let row = |k, macs, ms, acc| SweepRow {
            k,
            cnn_macs: macs,
            cnn_ms_per_image: ms,
            accuracy: acc,
            questions_per_s: 100.0,
            usage_by_group: BTreeMap::new(),
        };
        let has = |img: &image::RgbImage, i| {
            let RGBColor(r, g, b) = color(i);
            img.pixels().filter(|p| p.0 == [r, g, b]).count()
        };
        let rows = [
            row(12, 7_945_000, Some(0.101), Some(91.3)),
            row(6, 6_476_000, Some(0.083), Some(90.9)),
            row(3, 5_741_000, Some(0.079), Some(80.2)),
        ];
        let out = dir.join("sweep.png");
        draw_sweep(&rows, "sweep", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1200, 500));
        // Both panels: the MACs one in colour 0 (left half), the time one in
        // colour 1 (right half).
        let (left, right) = (has(&img, 0), has(&img, 1));
        assert!(left > 50 && right > 50, "{left} {right}");
        let RGBColor(r, g, b) = color(1);
        assert!(
            img.enumerate_pixels()
                .filter(|(_, _, p)| p.0 == [r, g, b])
                .all(|(x, _, _)| x >= 600)
        );
        // Burn's engine measures no time: the right panel has no points.
        // The rows with one field changed.
        let with = |f: fn(&mut SweepRow)| -> Vec<SweepRow> {
            rows.iter()
                .cloned()
                .map(|mut r| {
                    f(&mut r);
                    r
                })
                .collect()
        };
        let untimed = with(|r| r.cnn_ms_per_image = None);
        draw_sweep(&untimed, "sweep", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert!(has(&img, 0) > 50 && has(&img, 1) == 0);
        // One k: its point in each panel, no empty axis.
        draw_sweep(&rows[..1], "one k", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert!(has(&img, 0) > 20 && has(&img, 1) > 20);
        // No accuracy (a VQA test split): an error naming the file.
        let blind = with(|r| r.accuracy = None);
        let e = draw_sweep(&blind, "t", &dir.join("blind.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("blind.png") && e.contains("no accuracy"), "{e}");
        assert!(!dir.join("blind.png").exists());
    }
}
