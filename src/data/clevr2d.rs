//! CLEVR-2D: a flat, CLEVR-like scene and question generator, written in
//! the CLEVR v1.0 layout (see `clevr_format`) so that the same reader,
//! tokeniser and models serve it.
//!
//! Images are `image_size` x `image_size` (default 128) on a light gray
//! background, with 3 to 8 objects that do not overlap (bounding circles at
//! least 2 px apart) and lie fully inside the image. Each object has one of
//! CLEVR's eight colours (gray, red, blue, green, brown, purple, cyan,
//! yellow), one of three shapes (square, circle, triangle, each inscribed
//! in its bounding circle) and one of two sizes (small: radius
//! `image_size / 16`, large: radius `image_size / 9`).
//!
//! The questions follow the families of CLEVR (Johnson et al. 2017,
//! "CLEVR: A Diagnostic Dataset for Compositional Language and Elementary
//! Visual Reasoning"): existence, counting, attribute queries, attribute
//! comparison, integer comparison and spatial relations, each with a small
//! functional program whose last function names the question type:
//!
//! | index | family              | last function(s)                             | answers              |
//! |-------|---------------------|----------------------------------------------|----------------------|
//! | 0     | `exist`             | `exist`                                      | yes, no              |
//! | 1     | `count`             | `count`                                      | 0..8                 |
//! | 2     | `query_color`       | `query_color`                                | the eight colours    |
//! | 3     | `query_shape`       | `query_shape`                                | the three shapes     |
//! | 4     | `query_size`        | `query_size`                                 | small, large         |
//! | 5     | `compare_attribute` | `equal_color`, `equal_shape`, `equal_size`   | yes, no              |
//! | 6     | `compare_count`     | `greater_than`, `less_than`, `equal_integer` | yes, no              |
//! | 7     | `relate`            | `relate_query_color`, `relate_query_shape`   | colours, shapes      |
//!
//! Query, comparison and relation questions refer to objects by filters
//! that identify exactly one object and never name the asked attribute.
//! A relation question asks about the object nearest (Euclidean distance
//! between centres) to the reference among those strictly on the given
//! side of it (left/right: x; above/below: y, which grows downwards); it is
//! asked only when that object exists and is not tied.
//!
//! Answers are balanced by rejection sampling: for each question type (last
//! function) a candidate is kept only if its answer would not take the lead
//! over every other answer of that type by more than one, so the majority
//! answer of a yes/no type is at most one question above half. Families are
//! assigned to an image's question slots round-robin; a slot is left empty
//! after a bounded number of rejected candidates.

use std::collections::BTreeMap;
use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::DataError;
use crate::data::clevr_format::{
    ProgramStep, Question, Scene, SceneObject, create_split, image_filename, write_split,
};
pub use crate::data::sort_of_clevr::GenerateSummary;

/// CLEVR's eight colours and the RGB values they are drawn with.
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("gray", [87, 87, 87]),
    ("red", [173, 35, 35]),
    ("blue", [42, 75, 215]),
    ("green", [29, 105, 20]),
    ("brown", [129, 74, 25]),
    ("purple", [129, 38, 192]),
    ("cyan", [41, 208, 208]),
    ("yellow", [255, 238, 51]),
];
/// The shapes.
pub const SHAPES: [&str; 3] = ["square", "circle", "triangle"];
/// The sizes: index 0 is small, 1 is large.
pub const SIZES: [&str; 2] = ["small", "large"];
/// Background colour (light gray).
pub const BACKGROUND: [u8; 3] = [220, 220, 220];
/// Number of question families.
pub const NUM_FAMILIES: usize = 8;
/// Smallest allowed image side.
pub const MIN_IMAGE_SIZE: u32 = 64;
/// Fewest and most objects per scene.
pub const MIN_OBJECTS: usize = 3;
pub const MAX_OBJECTS: usize = 8;
/// Free pixels required between two bounding circles.
const MARGIN: f32 = 2.0;
/// Placement attempts per object before the scene is restarted.
const PLACE_TRIES: usize = 200;
/// Scene restarts before one object fewer is asked for.
const SCENE_RESTARTS: usize = 50;
/// Candidate questions tried per question slot before it is left empty.
const QUESTION_TRIES: usize = 50;

/// Name of question family `index` (`question_family_index`).
pub fn family_name(index: usize) -> &'static str {
    match index {
        0 => "exist",
        1 => "count",
        2 => "query_color",
        3 => "query_shape",
        4 => "query_size",
        5 => "compare_attribute",
        6 => "compare_count",
        7 => "relate",
        _ => "unknown",
    }
}

/// Radius of the bounding circle of an object of size `size` (0 small, 1
/// large) in an image of side `image_size`.
pub fn object_radius(size: usize, image_size: u32) -> f32 {
    if size == 0 {
        image_size as f32 / 16.0
    } else {
        image_size as f32 / 9.0
    }
}

/// What to generate.
#[derive(Debug, Clone, Serialize)]
pub struct Clevr2dConfig {
    pub train_images: usize,
    pub val_images: usize,
    /// Question slots per image (some may stay empty, see the module docs).
    pub questions_per_image: usize,
    /// Image side in pixels, at least [`MIN_IMAGE_SIZE`].
    pub image_size: u32,
    pub seed: u64,
}

impl Default for Clevr2dConfig {
    fn default() -> Self {
        Clevr2dConfig {
            train_images: 2000,
            val_images: 200,
            questions_per_image: 10,
            image_size: 128,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Object {
    color: usize,
    shape: usize,
    size: usize,
    x: i32,
    y: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    Size,
    Color,
    Shape,
}

const ATTRS: [Attr; 3] = [Attr::Size, Attr::Color, Attr::Shape];

impl Attr {
    fn name(self) -> &'static str {
        match self {
            Attr::Size => "size",
            Attr::Color => "color",
            Attr::Shape => "shape",
        }
    }

    fn of(self, o: &Object) -> usize {
        match self {
            Attr::Size => o.size,
            Attr::Color => o.color,
            Attr::Shape => o.shape,
        }
    }

    fn value_name(self, value: usize) -> &'static str {
        match self {
            Attr::Size => SIZES[value],
            Attr::Color => COLORS[value].0,
            Attr::Shape => SHAPES[value],
        }
    }

    fn cardinality(self) -> usize {
        match self {
            Attr::Size => SIZES.len(),
            Attr::Color => COLORS.len(),
            Attr::Shape => SHAPES.len(),
        }
    }
}

/// A conjunction of attribute values (`None`: any).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Filter {
    size: Option<usize>,
    color: Option<usize>,
    shape: Option<usize>,
}

impl Filter {
    fn get(&self, a: Attr) -> Option<usize> {
        match a {
            Attr::Size => self.size,
            Attr::Color => self.color,
            Attr::Shape => self.shape,
        }
    }

    fn set(&mut self, a: Attr, v: usize) {
        match a {
            Attr::Size => self.size = Some(v),
            Attr::Color => self.color = Some(v),
            Attr::Shape => self.shape = Some(v),
        }
    }

    fn matches(&self, o: &Object) -> bool {
        ATTRS
            .iter()
            .all(|&a| self.get(a).is_none_or(|v| a.of(o) == v))
    }

    fn count(&self, objects: &[Object]) -> usize {
        objects.iter().filter(|o| self.matches(o)).count()
    }

    /// "large red circle", "red objects", "small object".
    fn describe(&self, plural: bool) -> String {
        let mut words: Vec<&str> = Vec::with_capacity(3);
        if let Some(v) = self.size {
            words.push(SIZES[v]);
        }
        if let Some(v) = self.color {
            words.push(COLORS[v].0);
        }
        let noun = self.shape.map_or("object", |v| SHAPES[v]);
        let mut text = words.join(" ");
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(noun);
        if plural {
            text.push('s');
        }
        text
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Builds a program step by step.
#[derive(Default)]
struct Program(Vec<ProgramStep>);

impl Program {
    fn push(&mut self, function: &str, inputs: Vec<usize>, value_inputs: Vec<String>) -> usize {
        self.0.push(ProgramStep {
            function: function.into(),
            inputs,
            value_inputs,
        });
        self.0.len() - 1
    }

    /// `scene` then one `filter_*` step per attribute of `f` (CLEVR order:
    /// size, color, shape); returns the index of the last step.
    fn filtered(&mut self, f: &Filter) -> usize {
        let mut last = self.push("scene", vec![], vec![]);
        for a in ATTRS {
            if let Some(v) = f.get(a) {
                last = self.push(
                    &format!("filter_{}", a.name()),
                    vec![last],
                    vec![a.value_name(v).into()],
                );
            }
        }
        last
    }
}

/// A generated question before balancing.
struct Candidate {
    text: String,
    answer: String,
    program: Vec<ProgramStep>,
}

impl Candidate {
    fn function(&self) -> &str {
        self.program.last().map_or("", |s| s.function.as_str())
    }
}

fn shuffle<T>(rng: &mut ChaCha8Rng, items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// A filter on `n` distinct random attributes; values copied from a random
/// object when `from_object`, else uniform.
fn random_filter(rng: &mut ChaCha8Rng, objects: &[Object], n: usize, from_object: bool) -> Filter {
    let mut attrs = ATTRS;
    shuffle(rng, &mut attrs);
    let source = objects[rng.random_range(0..objects.len())];
    let mut f = Filter::default();
    for &a in &attrs[..n.min(attrs.len())] {
        let v = if from_object {
            a.of(&source)
        } else {
            rng.random_range(0..a.cardinality())
        };
        f.set(a, v);
    }
    f
}

/// A filter, not naming `exclude`, that matches object `target` and no
/// other; the attribute subsets are tried in random order.
fn unique_filter(
    rng: &mut ChaCha8Rng,
    objects: &[Object],
    target: usize,
    exclude: Option<Attr>,
) -> Option<Filter> {
    let allowed: Vec<Attr> = ATTRS.into_iter().filter(|&a| Some(a) != exclude).collect();
    let mut masks: Vec<usize> = (1..1usize << allowed.len()).collect();
    shuffle(rng, &mut masks);
    let t = objects[target];
    masks.into_iter().find_map(|mask| {
        let mut f = Filter::default();
        for (bit, &a) in allowed.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                f.set(a, a.of(&t));
            }
        }
        (f.count(objects) == 1).then_some(f)
    })
}

fn q_exist(rng: &mut ChaCha8Rng, objects: &[Object]) -> Option<Candidate> {
    let n = rng.random_range(1..=3);
    let f = random_filter(rng, objects, n, false);
    let desc = f.describe(false);
    let mut p = Program::default();
    let last = p.filtered(&f);
    p.push("exist", vec![last], vec![]);
    Some(Candidate {
        text: format!("Is there {} {desc}?", article(&desc)),
        answer: yes_no(f.count(objects) > 0),
        program: p.0,
    })
}

fn q_count(rng: &mut ChaCha8Rng, objects: &[Object]) -> Option<Candidate> {
    let n = rng.random_range(1..=3);
    let from_object = rng.random_bool(0.5);
    let f = random_filter(rng, objects, n, from_object);
    let mut p = Program::default();
    let last = p.filtered(&f);
    p.push("count", vec![last], vec![]);
    Some(Candidate {
        text: format!("How many {} are there?", f.describe(true)),
        answer: f.count(objects).to_string(),
        program: p.0,
    })
}

fn q_query(rng: &mut ChaCha8Rng, objects: &[Object], attr: Attr) -> Option<Candidate> {
    let target = rng.random_range(0..objects.len());
    let f = unique_filter(rng, objects, target, Some(attr))?;
    let mut p = Program::default();
    let last = p.filtered(&f);
    p.push(&format!("query_{}", attr.name()), vec![last], vec![]);
    Some(Candidate {
        text: format!("What {} is the {}?", attr.name(), f.describe(false)),
        answer: attr.value_name(attr.of(&objects[target])).into(),
        program: p.0,
    })
}

fn q_compare_attribute(rng: &mut ChaCha8Rng, objects: &[Object]) -> Option<Candidate> {
    let attr = ATTRS[rng.random_range(0..ATTRS.len())];
    let a = rng.random_range(0..objects.len());
    let va = attr.of(&objects[a]);
    let others: Vec<usize> = (0..objects.len()).filter(|&i| i != a).collect();
    let same: Vec<usize> = others
        .iter()
        .copied()
        .filter(|&i| attr.of(&objects[i]) == va)
        .collect();
    // Propose a pair sharing the attribute half of the time, so that "yes"
    // candidates are not rare (8 colours); balancing does the rest.
    let pool = if !same.is_empty() && rng.random_bool(0.5) {
        &same
    } else {
        &others
    };
    let b = pool[rng.random_range(0..pool.len())];
    let fa = unique_filter(rng, objects, a, Some(attr))?;
    let fb = unique_filter(rng, objects, b, Some(attr))?;
    let mut p = Program::default();
    let la = p.filtered(&fa);
    let lb = p.filtered(&fb);
    p.push(&format!("equal_{}", attr.name()), vec![la, lb], vec![]);
    Some(Candidate {
        text: format!(
            "Does the {} have the same {} as the {}?",
            fa.describe(false),
            attr.name(),
            fb.describe(false)
        ),
        answer: yes_no(va == attr.of(&objects[b])),
        program: p.0,
    })
}

fn q_compare_count(rng: &mut ChaCha8Rng, objects: &[Object]) -> Option<Candidate> {
    let (na, nb) = (rng.random_range(1..=2), rng.random_range(1..=2));
    let from_a = rng.random_bool(0.7);
    let fa = random_filter(rng, objects, na, from_a);
    let from_b = rng.random_bool(0.7);
    let fb = random_filter(rng, objects, nb, from_b);
    if fa == fb {
        return None;
    }
    let (ca, cb) = (fa.count(objects), fb.count(objects));
    let (da, db) = (fa.describe(true), fb.describe(true));
    let (function, text, answer) = match rng.random_range(0..3) {
        0 => (
            "greater_than",
            format!("Are there more {da} than {db}?"),
            ca > cb,
        ),
        1 => (
            "less_than",
            format!("Are there fewer {da} than {db}?"),
            ca < cb,
        ),
        _ => (
            "equal_integer",
            format!("Are there an equal number of {da} and {db}?"),
            ca == cb,
        ),
    };
    let mut p = Program::default();
    let la = p.filtered(&fa);
    let ka = p.push("count", vec![la], vec![]);
    let lb = p.filtered(&fb);
    let kb = p.push("count", vec![lb], vec![]);
    p.push(function, vec![ka, kb], vec![]);
    Some(Candidate {
        text,
        answer: yes_no(answer),
        program: p.0,
    })
}

/// Relations: name, phrase, and whether `o` lies strictly on that side of `r`.
const RELATIONS: [(&str, &str); 4] = [
    ("left", "to the left of"),
    ("right", "to the right of"),
    ("above", "above"),
    ("below", "below"),
];

fn on_side(relation: &str, r: &Object, o: &Object) -> bool {
    match relation {
        "left" => o.x < r.x,
        "right" => o.x > r.x,
        "above" => o.y < r.y,
        _ => o.y > r.y,
    }
}

/// The object nearest to `objects[reference]` strictly on side `relation`,
/// or `None` when there is none or the nearest distance is tied.
fn nearest_on_side(objects: &[Object], reference: usize, relation: &str) -> Option<usize> {
    let r = objects[reference];
    let dist = |o: &Object| (o.x - r.x).pow(2) + (o.y - r.y).pow(2);
    let mut side: Vec<(i32, usize)> = objects
        .iter()
        .enumerate()
        .filter(|&(i, o)| i != reference && on_side(relation, &r, o))
        .map(|(i, o)| (dist(o), i))
        .collect();
    side.sort_unstable();
    match side.as_slice() {
        [] => None,
        [(d0, _), (d1, _), ..] if d0 == d1 => None,
        [(_, i), ..] => Some(*i),
    }
}

fn q_relate(rng: &mut ChaCha8Rng, objects: &[Object]) -> Option<Candidate> {
    let reference = rng.random_range(0..objects.len());
    let (relation, phrase) = RELATIONS[rng.random_range(0..RELATIONS.len())];
    let attr = if rng.random_bool(0.5) {
        Attr::Color
    } else {
        Attr::Shape
    };
    let f = unique_filter(rng, objects, reference, None)?;
    let answer_object = nearest_on_side(objects, reference, relation)?;
    let mut p = Program::default();
    let last = p.filtered(&f);
    p.push(
        &format!("relate_query_{}", attr.name()),
        vec![last],
        vec![relation.into()],
    );
    Some(Candidate {
        text: format!(
            "What {} is the nearest object {phrase} the {}?",
            attr.name(),
            f.describe(false)
        ),
        answer: attr.value_name(attr.of(&objects[answer_object])).into(),
        program: p.0,
    })
}

fn candidate(rng: &mut ChaCha8Rng, objects: &[Object], family: usize) -> Option<Candidate> {
    match family {
        0 => q_exist(rng, objects),
        1 => q_count(rng, objects),
        2 => q_query(rng, objects, Attr::Color),
        3 => q_query(rng, objects, Attr::Shape),
        4 => q_query(rng, objects, Attr::Size),
        5 => q_compare_attribute(rng, objects),
        6 => q_compare_count(rng, objects),
        _ => q_relate(rng, objects),
    }
}

/// Running answer counts per question type (last function).
#[derive(Default)]
struct Balancer(BTreeMap<String, BTreeMap<String, usize>>);

impl Balancer {
    /// Whether `answer` may be added to `function` without leading every
    /// other answer of that function by more than one.
    fn accepts(&self, function: &str, answer: &str) -> bool {
        let Some(counts) = self.0.get(function) else {
            return true;
        };
        let own = counts.get(answer).copied().unwrap_or(0);
        let best_other = counts
            .iter()
            .filter(|(a, _)| a.as_str() != answer)
            .map(|(_, &c)| c)
            .max()
            .unwrap_or(0);
        own <= best_other
    }

    fn add(&mut self, function: &str, answer: &str) {
        *self
            .0
            .entry(function.to_string())
            .or_default()
            .entry(answer.to_string())
            .or_default() += 1;
    }
}

/// Places 3..=8 non-overlapping objects fully inside the image.
fn place_objects(rng: &mut ChaCha8Rng, image_size: u32) -> Vec<Object> {
    let mut wanted = rng.random_range(MIN_OBJECTS..=MAX_OBJECTS);
    let mut restarts = 0;
    'scene: loop {
        if restarts == SCENE_RESTARTS {
            // Only reachable for crowded small images; 3 objects always fit.
            restarts = 0;
            wanted = (wanted - 1).max(MIN_OBJECTS);
        }
        let mut objects: Vec<Object> = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            let size = rng.random_range(0..SIZES.len());
            let r = object_radius(size, image_size);
            let lo = r.ceil() as i32;
            let hi = image_size as i32 - 1 - lo;
            let placed = (0..PLACE_TRIES).find_map(|_| {
                let (x, y) = (rng.random_range(lo..=hi), rng.random_range(lo..=hi));
                let free = objects.iter().all(|o| {
                    let gap = object_radius(o.size, image_size) + r + MARGIN;
                    (((o.x - x).pow(2) + (o.y - y).pow(2)) as f32) >= gap * gap
                });
                free.then_some((x, y))
            });
            let Some((x, y)) = placed else {
                restarts += 1;
                continue 'scene;
            };
            objects.push(Object {
                color: rng.random_range(0..COLORS.len()),
                shape: rng.random_range(0..SHAPES.len()),
                size,
                x,
                y,
            });
        }
        return objects;
    }
}

/// Whether offset (dx, dy) from the centre lies inside `shape` inscribed in
/// a circle of radius `r`.
fn inside(shape: usize, dx: f32, dy: f32, r: f32) -> bool {
    match SHAPES[shape] {
        "square" => {
            let h = r * std::f32::consts::FRAC_1_SQRT_2;
            dx.abs() <= h && dy.abs() <= h
        }
        "circle" => dx * dx + dy * dy <= r * r,
        // Equilateral, pointing up, vertices on the circle.
        _ => 3f32.sqrt() * dx.abs() - r <= dy && dy <= r / 2.0,
    }
}

fn render(objects: &[Object], image_size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(image_size, image_size, Rgb(BACKGROUND));
    let last = image_size as i32 - 1;
    for o in objects {
        let r = object_radius(o.size, image_size);
        let reach = r.ceil() as i32;
        let rgb = Rgb(COLORS[o.color].1);
        for y in (o.y - reach).max(0)..=(o.y + reach).min(last) {
            for x in (o.x - reach).max(0)..=(o.x + reach).min(last) {
                if inside(o.shape, (x - o.x) as f32, (y - o.y) as f32, r) {
                    img.put_pixel(x as u32, y as u32, rgb);
                }
            }
        }
    }
    img
}

fn scene_object(o: &Object) -> SceneObject {
    SceneObject {
        color: COLORS[o.color].0.into(),
        shape: SHAPES[o.shape].into(),
        size: SIZES[o.size].into(),
        x: o.x as f32,
        y: o.y as f32,
    }
}

/// Writes a CLEVR-2D dataset under `out` in the CLEVR layout.
/// Deterministic for a seed (ChaCha8, one stream per split).
pub fn generate(out: &Path, cfg: &Clevr2dConfig) -> Result<GenerateSummary, DataError> {
    if cfg.image_size < MIN_IMAGE_SIZE {
        return Err(DataError::io(
            out,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "image size {} is below the minimum {MIN_IMAGE_SIZE}",
                    cfg.image_size
                ),
            ),
        ));
    }
    let mut counts = [0usize; 2];
    for (split_id, (split, n)) in [("train", cfg.train_images), ("val", cfg.val_images)]
        .into_iter()
        .enumerate()
    {
        let paths = create_split(out, split)?;
        let mut rng = ChaCha8Rng::seed_from_u64(
            cfg.seed
                .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                .wrapping_add(0x2D_C1E5 + split_id as u64),
        );
        let mut balancer = Balancer::default();
        let mut questions = Vec::with_capacity(n * cfg.questions_per_image);
        let mut scenes = Vec::with_capacity(n);
        for index in 0..n {
            let objects = place_objects(&mut rng, cfg.image_size);
            let filename = image_filename(split, index);
            let path = paths.images.join(&filename);
            render(&objects, cfg.image_size)
                .save(&path)
                .map_err(|e| DataError::image(&path, e))?;
            let mut texts: Vec<String> = Vec::with_capacity(cfg.questions_per_image);
            for slot in 0..cfg.questions_per_image {
                let family = (index * cfg.questions_per_image + slot) % NUM_FAMILIES;
                for _ in 0..QUESTION_TRIES {
                    let Some(c) = candidate(&mut rng, &objects, family) else {
                        continue;
                    };
                    if texts.contains(&c.text) || !balancer.accepts(c.function(), &c.answer) {
                        continue;
                    }
                    balancer.add(c.function(), &c.answer);
                    texts.push(c.text.clone());
                    questions.push(Question {
                        split: split.into(),
                        image_index: index,
                        image_filename: filename.clone(),
                        question: c.text,
                        answer: Some(c.answer),
                        question_family_index: Some(family),
                        program: Some(c.program),
                    });
                    break;
                }
            }
            scenes.push(Scene {
                split: split.into(),
                image_index: index,
                image_filename: filename,
                objects: objects.iter().map(scene_object).collect(),
            });
        }
        let info = serde_json::json!({
            "dataset": "clevr2d",
            "generator": "moevqa",
            "seed": cfg.seed,
            "split": split,
            "image_size": cfg.image_size,
            "questions_per_image": cfg.questions_per_image,
        });
        counts[split_id] = write_split(&paths, info, questions, scenes)?;
    }
    Ok(GenerateSummary::new(
        [cfg.train_images, cfg.val_images],
        counts,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::clevr_format::{QuestionFile, SceneFile, read_split_files, split_paths};

    fn tmp(name: &str) -> std::path::PathBuf {
        crate::data::test_dir(&format!("c2d-{name}"))
    }

    fn load(dir: &Path, split: &str) -> (QuestionFile, SceneFile) {
        read_split_files(dir, split).unwrap()
    }

    fn cfg(train: usize, val: usize, image_size: u32, seed: u64) -> Clevr2dConfig {
        Clevr2dConfig {
            train_images: train,
            val_images: val,
            questions_per_image: 10,
            image_size,
            seed,
        }
    }

    fn color_rgb(name: &str) -> [u8; 3] {
        COLORS.iter().find(|c| c.0 == name).unwrap().1
    }

    fn radius(o: &SceneObject, image_size: u32) -> f32 {
        let size = SIZES.iter().position(|s| *s == o.size).unwrap();
        object_radius(size, image_size)
    }

    fn attr<'a>(o: &'a SceneObject, name: &str) -> &'a str {
        match name {
            "color" => &o.color,
            "shape" => &o.shape,
            "size" => &o.size,
            other => panic!("unknown attribute {other}"),
        }
    }

    /// Value of one program step, computed from the scene file alone.
    #[derive(Debug, Clone)]
    enum Value {
        Objects(Vec<usize>),
        Int(usize),
        Answer(String),
    }

    fn objects_of(v: &Value) -> &[usize] {
        match v {
            Value::Objects(o) => o,
            other => panic!("expected objects, got {other:?}"),
        }
    }

    fn int_of(v: &Value) -> usize {
        match v {
            Value::Int(n) => *n,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    fn unique_of<'a>(v: &Value, scene: &'a Scene) -> &'a SceneObject {
        let o = objects_of(v);
        assert_eq!(o.len(), 1, "filter must identify exactly one object");
        &scene.objects[o[0]]
    }

    /// An independent interpreter of the generated programs.
    fn execute(program: &[ProgramStep], scene: &Scene) -> String {
        let mut values: Vec<Value> = Vec::new();
        let yn = |b: bool| Value::Answer(if b { "yes" } else { "no" }.into());
        for step in program {
            let arg = |k: usize| values[step.inputs[k]].clone();
            let value = match step.function.as_str() {
                "scene" => Value::Objects((0..scene.objects.len()).collect()),
                f if f.starts_with("filter_") => {
                    let a = &f["filter_".len()..];
                    let want = &step.value_inputs[0];
                    Value::Objects(
                        objects_of(&arg(0))
                            .iter()
                            .copied()
                            .filter(|&i| attr(&scene.objects[i], a) == want)
                            .collect(),
                    )
                }
                "exist" => yn(!objects_of(&arg(0)).is_empty()),
                "count" => Value::Int(objects_of(&arg(0)).len()),
                f if f.starts_with("query_") => {
                    Value::Answer(attr(unique_of(&arg(0), scene), &f["query_".len()..]).into())
                }
                f if f.starts_with("equal_") && f != "equal_integer" => {
                    let a = &f["equal_".len()..];
                    let (x, y) = (unique_of(&arg(0), scene), unique_of(&arg(1), scene));
                    assert!(!std::ptr::eq(x, y), "compared object with itself");
                    yn(attr(x, a) == attr(y, a))
                }
                "greater_than" => yn(int_of(&arg(0)) > int_of(&arg(1))),
                "less_than" => yn(int_of(&arg(0)) < int_of(&arg(1))),
                "equal_integer" => yn(int_of(&arg(0)) == int_of(&arg(1))),
                f if f.starts_with("relate_query_") => {
                    let r = unique_of(&arg(0), scene);
                    let side = |o: &SceneObject| match step.value_inputs[0].as_str() {
                        "left" => o.x < r.x,
                        "right" => o.x > r.x,
                        "above" => o.y < r.y,
                        "below" => o.y > r.y,
                        other => panic!("unknown relation {other}"),
                    };
                    let d = |o: &SceneObject| (o.x - r.x).powi(2) + (o.y - r.y).powi(2);
                    let mut near: Vec<&SceneObject> =
                        scene.objects.iter().filter(|o| side(o)).collect();
                    near.sort_by(|a, b| d(a).total_cmp(&d(b)));
                    assert!(!near.is_empty(), "no object on that side");
                    if near.len() > 1 {
                        assert!(d(near[0]) < d(near[1]), "tied nearest object");
                    }
                    Value::Answer(attr(near[0], &f["relate_query_".len()..]).into())
                }
                other => panic!("unknown function {other}"),
            };
            values.push(value);
        }
        match values.pop() {
            Some(Value::Answer(a)) => a,
            Some(Value::Int(n)) => n.to_string(),
            other => panic!("program ends in {other:?}"),
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let c = cfg(15, 4, 128, 5);
        let (a, b, other) = (tmp("a"), tmp("b"), tmp("c"));
        let sum = generate(&a, &c).unwrap();
        generate(&b, &c).unwrap();
        assert!(sum.train_questions > 100 && sum.val_questions > 20);
        for split in ["train", "val"] {
            let pa = split_paths(&a, split);
            let pb = split_paths(&b, split);
            assert_eq!(
                std::fs::read(&pa.questions).unwrap(),
                std::fs::read(&pb.questions).unwrap()
            );
            assert_eq!(
                std::fs::read(&pa.scenes).unwrap(),
                std::fs::read(&pb.scenes).unwrap()
            );
            let name = image_filename(split, 0);
            assert_eq!(
                std::fs::read(pa.images.join(&name)).unwrap(),
                std::fs::read(pb.images.join(&name)).unwrap()
            );
        }
        generate(&other, &Clevr2dConfig { seed: 6, ..c }).unwrap();
        let texts = |d: &Path| -> Vec<String> {
            load(d, "train")
                .0
                .questions
                .into_iter()
                .map(|q| q.question)
                .collect()
        };
        assert_ne!(texts(&a), texts(&other));
        for d in [a, b, other] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn writes_the_layout_and_consistent_images() {
        for image_size in [128, 64] {
            let dir = tmp(&format!("layout{image_size}"));
            let c = cfg(40, 3, image_size, 3);
            generate(&dir, &c).unwrap();
            let mut counts_seen = [false; MAX_OBJECTS + 1];
            for (split, n) in [("train", 40), ("val", 3)] {
                let p = split_paths(&dir, split);
                assert!(
                    p.questions
                        .ends_with(format!("questions/CLEVR_{split}_questions.json"))
                );
                assert!(
                    p.scenes
                        .ends_with(format!("scenes/CLEVR_{split}_scenes.json"))
                );
                let (qf, sf) = load(&dir, split);
                assert_eq!(sf.scenes.len(), n);
                assert!(qf.questions.iter().all(|q| q.split == split));
                for (i, scene) in sf.scenes.iter().enumerate() {
                    assert_eq!(scene.image_index, i);
                    assert_eq!(scene.image_filename, format!("CLEVR_{split}_{i:06}.png"));
                    let path = dir.join("images").join(split).join(&scene.image_filename);
                    let img = image::open(&path).unwrap().to_rgb8();
                    assert_eq!(img.dimensions(), (image_size, image_size));
                    let k = scene.objects.len();
                    assert!((MIN_OBJECTS..=MAX_OBJECTS).contains(&k), "{k} objects");
                    counts_seen[k] = true;
                    for (j, o) in scene.objects.iter().enumerate() {
                        let r = radius(o, image_size);
                        assert!(o.x - r >= 0.0 && o.x + r <= (image_size - 1) as f32);
                        assert!(o.y - r >= 0.0 && o.y + r <= (image_size - 1) as f32);
                        assert_eq!(img.get_pixel(o.x as u32, o.y as u32).0, color_rgb(&o.color));
                        for p in &scene.objects[..j] {
                            let d = ((p.x - o.x).powi(2) + (p.y - o.y).powi(2)).sqrt();
                            assert!(d >= r + radius(p, image_size), "overlap in {path:?}");
                        }
                    }
                }
            }
            if image_size == 128 {
                assert!(counts_seen[MIN_OBJECTS] && counts_seen[MAX_OBJECTS]);
            }
            std::fs::remove_dir_all(dir).unwrap();
        }
        let bad = tmp("bad");
        assert!(generate(&bad, &cfg(1, 1, 63, 1)).is_err());
        let _ = std::fs::remove_dir_all(bad);
    }

    #[test]
    fn answers_follow_from_the_scenes() {
        let dir = tmp("answers");
        generate(&dir, &cfg(60, 5, 128, 7)).unwrap();
        let mut families = [0usize; NUM_FAMILIES];
        for split in ["train", "val"] {
            let (qf, sf) = load(&dir, split);
            for q in &qf.questions {
                let scene = &sf.scenes[q.image_index];
                let program = q.program.as_ref().unwrap();
                let family = q.question_family_index.unwrap();
                families[family] += 1;
                let t = q.question_type().unwrap();
                let expected_family = match t {
                    "exist" => 0,
                    "count" => 1,
                    "query_color" => 2,
                    "query_shape" => 3,
                    "query_size" => 4,
                    "equal_color" | "equal_shape" | "equal_size" => 5,
                    "greater_than" | "less_than" | "equal_integer" => 6,
                    "relate_query_color" | "relate_query_shape" => 7,
                    other => panic!("unknown type {other}"),
                };
                assert_eq!(family, expected_family, "{}", q.question);
                assert!(q.question.ends_with('?'));
                // Every filter value is a word of the question.
                let words: Vec<String> = q
                    .question
                    .to_lowercase()
                    .trim_end_matches('?')
                    .split(' ')
                    .map(str::to_string)
                    .collect();
                for step in program {
                    for v in &step.value_inputs {
                        if step.function.starts_with("filter_") {
                            let found =
                                words.iter().any(|w| w == v || w.trim_end_matches('s') == v);
                            assert!(found, "{v} not in {:?}", q.question);
                        }
                    }
                }
                assert_eq!(
                    execute(program, scene),
                    q.answer.clone().unwrap(),
                    "{}",
                    q.question
                );
            }
        }
        assert!(families.iter().all(|&n| n > 0), "{families:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn answers_are_balanced_within_each_family() {
        let dir = tmp("balance");
        generate(&dir, &cfg(300, 1, 128, 11)).unwrap();
        let (qf, _) = load(&dir, "train");
        assert!(
            qf.questions.len() >= 2900,
            "{} questions",
            qf.questions.len()
        );
        for family in 0..NUM_FAMILIES {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            let mut total = 0;
            for q in &qf.questions {
                if q.question_family_index == Some(family) {
                    *counts.entry(q.answer.as_deref().unwrap()).or_default() += 1;
                    total += 1;
                }
            }
            let majority = counts.values().copied().max().unwrap_or(0);
            assert!(total >= 50, "{}: {total} questions", family_name(family));
            assert!(
                majority as f64 <= 0.55 * total as f64,
                "{}: {counts:?}",
                family_name(family)
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
