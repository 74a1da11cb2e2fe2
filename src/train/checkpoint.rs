//! Checkpoints of a training run: model, optimizer state and trainer state.
//!
//! # What is stored where
//!
//! A checkpoint is one directory (for a run, `RUN/checkpoint/`) holding:
//!
//! - `model.bpk`: the module's tensors (parameters and buffers such as
//!   BatchNorm's running mean and variance), keyed by module path, as a Burn
//!   [`ModuleRecord`] in the burnpack format. The record also keeps each
//!   parameter's [`ParamId`](burn::module::ParamId), and loading gives the
//!   parameters those ids back: the optimizer state is keyed by them.
//! - `optimizer.bpk`: the optimizer state (for Adam: step count and the two
//!   moment estimates of every parameter), keyed by `ParamId`, from
//!   [`ModuleOptimizer::into_bytes`], again burnpack.
//! - `state.json`: the [`TrainState`] (epochs completed, global step, seed,
//!   metrics) as JSON.
//! - `manifest.json`, written last: format version, the model's
//!   architecture (its `Display` form, which also shows the module's
//!   non-tensor constants, e.g. the CNN's `k` or a dropout probability, that
//!   records do not hold), every tensor's path and shape, and each file's
//!   size and FNV-1a 64 checksum. Loading checks the model it is given
//!   against the manifest before touching any tensor, so a checkpoint of
//!   another configuration is refused with a message naming what differs,
//!   and a damaged file is refused before it is decoded.
//!
//! Running statistics: Burn's `RunningState` (BatchNorm's running mean and
//! variance) keeps its latest update pending per thread, and a record taken
//! as is would hold the value from one update earlier. Saving therefore
//! records `model.valid()`, which syncs those states first (the caller's
//! model shares them and sees the same values). Note that clones of a module
//! share its running states.
//!
//! # Why the swap is atomic
//!
//! [`save_checkpoint`] never writes into `dir`. It writes every file into a
//! fresh sibling `dir.tmp-<pid>`, fsyncs each file and then that directory,
//! and only then swaps it in with renames (a rename within one directory is
//! atomic), fsyncing the parent after each:
//!
//! 1. a complete `dir` is renamed to `dir.old` (a stale `dir.old` is first
//!    removed; when `dir` is absent or incomplete, `dir.old` is left alone:
//!    it is then the newest complete checkpoint);
//! 2. `dir.tmp-<pid>` is renamed to `dir`;
//! 3. `dir.old` is removed.
//!
//! A directory is complete exactly when it holds `manifest.json`, since that
//! file is written last and a directory only gets the name `dir` or
//! `dir.old` once it is complete. Killed at any moment, a run therefore
//! leaves a complete `dir` (the previous checkpoint before step 1, the new
//! one after step 2) or, between steps 1 and 2, only a complete `dir.old`.
//! [`load_checkpoint`] and [`has_checkpoint`] use `dir` when it is complete
//! and fall back to `dir.old` otherwise. Leftover `dir.tmp-*` directories
//! are never read and are removed by the next save; one process at a time
//! may save to a given `dir`.

use std::ffi::OsString;
use std::fmt::Display;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::ModuleOptimizer;
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::{Bool, Bytes, Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The module's tensors (burnpack).
pub const MODEL_FILE: &str = "model.bpk";
/// The optimizer state (burnpack).
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The trainer state (JSON).
pub const STATE_FILE: &str = "state.json";
/// Checksums, tensor shapes and architecture; written last (JSON).
pub const MANIFEST_FILE: &str = "manifest.json";

const FORMAT: &str = "moevqa-checkpoint";
const VERSION: u32 = 1;

/// Trainer state saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken over the whole run.
    pub step: u64,
    /// Seed of the run's random number generators.
    pub seed: u64,
    /// Free-form metrics (e.g. the last epoch's line, best accuracy).
    pub metrics: serde_json::Value,
    /// Set by a checkpoint taken inside an epoch: how far that epoch got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
}

/// How far an epoch had got when a mid-epoch checkpoint was taken: enough
/// to go on from the next batch and to report the epoch as if it had never
/// stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// The epoch in progress (0-based: `epoch` epochs were complete).
    pub epoch: usize,
    /// Batches done in it.
    pub batches: usize,
    /// Questions done in it.
    pub seen: usize,
    /// Sum over its questions of the loss.
    pub loss_sum: f64,
    /// Sum over its questions of the training score (1 per right answer,
    /// or the VQA soft score).
    pub score_sum: f64,
    /// Wall time spent on it so far.
    pub seconds: f64,
}

/// Why a checkpoint could not be saved or loaded. Each message is one line
/// and names the file or directory concerned.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Neither `dir` nor `dir.old` holds a complete checkpoint.
    #[error("no checkpoint at {} (nor at {})", .dir.display(), .old.display())]
    NotFound { dir: PathBuf, old: PathBuf },
    /// A file system operation failed.
    #[error("checkpoint {}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A file is damaged: wrong size or checksum, or it does not decode.
    #[error("checkpoint file {} is corrupt: {detail}", .path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The checkpoint was saved from a model of another configuration.
    #[error("checkpoint file {} does not match the model: {detail}", .path.display())]
    Mismatch { path: PathBuf, detail: String },
    /// Something could not be encoded, or the path cannot hold a checkpoint.
    #[error("checkpoint {}: {detail}", .path.display())]
    Invalid { path: PathBuf, detail: String },
}

impl CheckpointError {
    fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }

    fn corrupt(path: &Path, detail: impl Display) -> Self {
        Self::Corrupt {
            path: path.to_path_buf(),
            detail: one_line(detail),
        }
    }

    fn mismatch(path: &Path, detail: impl Display) -> Self {
        Self::Mismatch {
            path: path.to_path_buf(),
            detail: one_line(detail),
        }
    }

    fn invalid(path: &Path, detail: impl Display) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            detail: one_line(detail),
        }
    }
}

/// An optimizer whose state a checkpoint can hold.
///
/// Implemented for Burn's [`ModuleOptimizer`], what `AdamConfig::init`
/// (and the other optimizer configs' `init`) return in Burn 0.22.
pub trait OptimizerState: Sized {
    /// The state, serialised.
    fn state_to_bytes(&self) -> Result<Bytes, RecordError>;
    /// `self` with the state of `bytes`.
    fn state_from_bytes(self, bytes: Bytes) -> Result<Self, RecordError>;
}

impl OptimizerState for ModuleOptimizer {
    fn state_to_bytes(&self) -> Result<Bytes, RecordError> {
        self.into_bytes()
    }

    fn state_from_bytes(self, bytes: Bytes) -> Result<Self, RecordError> {
        self.from_bytes(bytes)
    }
}

/// A checkpoint directory, e.g. `RUN/checkpoint/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub dir: PathBuf,
}

impl Checkpoint {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `RUN/checkpoint/` of the run directory `run`.
    pub fn of_run(run: &Path) -> Self {
        Self::new(run.join("checkpoint"))
    }

    /// See [`has_checkpoint`].
    pub fn exists(&self) -> bool {
        has_checkpoint(&self.dir)
    }

    /// See [`save_checkpoint`].
    pub fn save<M, O>(
        &self,
        model: &M,
        optim: &O,
        state: &TrainState,
    ) -> Result<(), CheckpointError>
    where
        M: Module + Display,
        O: OptimizerState,
    {
        save_checkpoint(&self.dir, model, optim, state)
    }

    /// See [`load_checkpoint`].
    pub fn load<M, O>(
        &self,
        model: M,
        optim: O,
        device: &Device,
    ) -> Result<(M, O, TrainState), CheckpointError>
    where
        M: Module + Display,
        O: OptimizerState,
    {
        load_checkpoint(&self.dir, model, optim, device)
    }

    /// See [`load_train_state`].
    pub fn train_state(&self) -> Result<TrainState, CheckpointError> {
        load_train_state(&self.dir)
    }
}

/// Whether `dir` (or, after a save killed mid-swap, `dir.old`) holds a
/// complete checkpoint.
pub fn has_checkpoint(dir: &Path) -> bool {
    locate(dir).is_ok()
}

/// Saves `model`, the state of `optim` and `state` to `dir`, atomically
/// replacing the checkpoint there (see the module docs).
pub fn save_checkpoint<M, O>(
    dir: &Path,
    model: &M,
    optim: &O,
    state: &TrainState,
) -> Result<(), CheckpointError>
where
    M: Module + Display,
    O: OptimizerState,
{
    let (parent, name) = split_dir(dir)?;
    fs::create_dir_all(&parent).map_err(|e| CheckpointError::io(&parent, "create directory", e))?;
    remove_stale_tmps(&parent, &name)?;
    let tmp = sibling(dir, &name, &format!("tmp-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, "create directory", e))?;
    let written = write_tmp(&tmp, model, optim, state);
    let swapped = written.and_then(|()| swap_in(dir, &tmp, &parent, &name));
    if swapped.is_err() {
        // Best effort: the checkpoint in place (if any) is untouched.
        let _ = fs::remove_dir_all(&tmp);
    }
    swapped
}

/// Copies the complete checkpoint in `src` (or `src.old`) to `dst`,
/// replacing the one there with the same atomic swap as
/// [`save_checkpoint`]. Files are hard-linked where the file system allows
/// (no bytes are copied: a save never writes into an existing file, it
/// writes new ones and swaps, so later saves to `src` leave `dst` as it
/// is), else copied and fsynced. Its files are checked against their
/// manifest entries when `dst` is loaded, as any checkpoint's are.
pub fn copy_checkpoint(src: &Path, dst: &Path) -> Result<(), CheckpointError> {
    let from = locate(src)?;
    let manifest = read_manifest(&from.join(MANIFEST_FILE))?;
    let (parent, name) = split_dir(dst)?;
    fs::create_dir_all(&parent).map_err(|e| CheckpointError::io(&parent, "create directory", e))?;
    remove_stale_tmps(&parent, &name)?;
    let tmp = sibling(dst, &name, &format!("tmp-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| CheckpointError::io(&tmp, "create directory", e))?;
    // The manifest last, as in a save: a directory is complete once it is there.
    let names = manifest
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain([MANIFEST_FILE]);
    let mut copied = Ok(());
    for file in names {
        let (a, b) = (from.join(file), tmp.join(file));
        copied = fs::hard_link(&a, &b)
            .or_else(|_| fs::copy(&a, &b).and_then(|_| File::open(&b)?.sync_all()))
            .map_err(|e| CheckpointError::io(&b, "copy", e));
        if copied.is_err() {
            break;
        }
    }
    let swapped = copied
        .and_then(|()| sync_dir(&tmp))
        .and_then(|()| swap_in(dst, &tmp, &parent, &name));
    if swapped.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    swapped
}

/// Loads the checkpoint in `dir` (or `dir.old`, see the module docs) into
/// `model` and `optim`.
///
/// `model` must be built with the configuration the checkpoint was saved
/// from; it is first moved to `device` with [`Module::fork`] (nothing to do
/// when it is already there) and its tensors, and their parameter ids, are
/// then replaced by the checkpoint's. `optim` should be fresh: its state is
/// replaced by the checkpoint's, keyed by those parameter ids.
pub fn load_checkpoint<M, O>(
    dir: &Path,
    model: M,
    optim: O,
    device: &Device,
) -> Result<(M, O, TrainState), CheckpointError>
where
    M: Module + Display,
    O: OptimizerState,
{
    let src = locate(dir)?;
    let manifest_path = src.join(MANIFEST_FILE);
    let manifest = read_manifest(&manifest_path)?;
    let model_path = src.join(MODEL_FILE);
    check_model(&model_path, &manifest, &model)?;

    let bytes = read_checked(&src, MODEL_FILE, &manifest)?;
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| CheckpointError::corrupt(&model_path, e))?;
    // Sync pending running-state updates (see `write_tmp`) so that none of
    // them lands on top of the loaded values later.
    let _ = model.valid();
    let model = model
        .fork(device)
        .try_load_record(record)
        .map_err(|e| match e {
            RecordError::Validation(msg) => CheckpointError::mismatch(&model_path, msg),
            RecordError::Io(msg) => CheckpointError::corrupt(&model_path, msg),
        })?;

    let optim_path = src.join(OPTIMIZER_FILE);
    let bytes = read_checked(&src, OPTIMIZER_FILE, &manifest)?;
    let optim = optim
        .state_from_bytes(Bytes::from_bytes_vec(bytes))
        .map_err(|e| CheckpointError::corrupt(&optim_path, e))?;

    let state = parse_state(&src, &manifest)?;
    Ok((model, optim, state))
}

/// Only the [`TrainState`] of the checkpoint in `dir` (or `dir.old`).
pub fn load_train_state(dir: &Path) -> Result<TrainState, CheckpointError> {
    let src = locate(dir)?;
    let manifest = read_manifest(&src.join(MANIFEST_FILE))?;
    parse_state(&src, &manifest)
}

// ---------------------------------------------------------------------------
// Saving.

fn write_tmp<M, O>(
    tmp: &Path,
    model: &M,
    optim: &O,
    state: &TrainState,
) -> Result<(), CheckpointError>
where
    M: Module + Display,
    O: OptimizerState,
{
    let parameters = parameter_shapes(model);
    let architecture = model.to_string();

    let path = tmp.join(MODEL_FILE);
    // `valid()` first: a `RunningState` (BatchNorm's running mean and
    // variance) keeps its latest update pending per thread, and a record
    // taken without syncing holds the value from one update earlier.
    // `valid()` syncs those shared states (so the caller's model sees the
    // same values) and gives the same tensors and ids, minus the graph.
    let bytes =
        model.valid().into_record().into_bytes().map_err(|e| {
            CheckpointError::invalid(&path, format!("cannot encode the model: {e}"))
        })?;
    let model_entry = write_synced(&path, MODEL_FILE, &bytes)?;

    let path = tmp.join(OPTIMIZER_FILE);
    let bytes = optim.state_to_bytes().map_err(|e| {
        CheckpointError::invalid(&path, format!("cannot encode the optimizer state: {e}"))
    })?;
    let optim_entry = write_synced(&path, OPTIMIZER_FILE, &bytes)?;

    let path = tmp.join(STATE_FILE);
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| CheckpointError::invalid(&path, format!("cannot encode the state: {e}")))?;
    let state_entry = write_synced(&path, STATE_FILE, &bytes)?;

    let manifest = Manifest {
        format: FORMAT.to_string(),
        version: VERSION,
        files: vec![model_entry, optim_entry, state_entry],
        parameters,
        architecture,
    };
    let path = tmp.join(MANIFEST_FILE);
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| CheckpointError::invalid(&path, format!("cannot encode the manifest: {e}")))?;
    write_synced(&path, MANIFEST_FILE, &bytes)?;
    sync_dir(tmp)
}

/// Steps 1 to 3 of the module docs.
fn swap_in(dir: &Path, tmp: &Path, parent: &Path, name: &OsString) -> Result<(), CheckpointError> {
    let old = sibling(dir, name, "old");
    if is_complete(dir) {
        remove_dir_if_present(&old)?;
        fs::rename(dir, &old).map_err(|e| CheckpointError::io(dir, "rename to .old", e))?;
        sync_dir(parent)?;
    } else if dir.symlink_metadata().is_ok() {
        // Incomplete (e.g. created by hand): never a checkpoint, while
        // `dir.old`, if any, stays the newest complete one until step 2.
        remove_dir_if_present(dir)?;
        sync_dir(parent)?;
    }
    fs::rename(tmp, dir)
        .map_err(|e| CheckpointError::io(dir, "rename the new checkpoint into", e))?;
    sync_dir(parent)?;
    remove_dir_if_present(&old)?;
    sync_dir(parent)
}

/// Writes `bytes` to `path` and fsyncs it.
fn write_synced(path: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry, CheckpointError> {
    let mut file = File::create(path).map_err(|e| CheckpointError::io(path, "create file", e))?;
    file.write_all(bytes)
        .map_err(|e| CheckpointError::io(path, "write", e))?;
    file.sync_all()
        .map_err(|e| CheckpointError::io(path, "fsync", e))?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        fnv1a64: format!("{:016x}", fnv1a64(bytes)),
    })
}

/// Fsyncs a directory, so that the entries created or renamed in it persist.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CheckpointError::io(dir, "fsync directory", e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn remove_dir_if_present(path: &Path) -> Result<(), CheckpointError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CheckpointError::io(path, "remove directory", e)),
    }
}

/// Removes the `name.tmp-*` siblings left by saves that were killed.
fn remove_stale_tmps(parent: &Path, name: &OsString) -> Result<(), CheckpointError> {
    let mut prefix = name.clone();
    prefix.push(".tmp-");
    let prefix = prefix.to_string_lossy().into_owned();
    let entries = match fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) => return Err(CheckpointError::io(parent, "list directory", e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_dir_if_present(&entry.path())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Loading.

/// `dir` when complete, else `dir.old` when complete.
fn locate(dir: &Path) -> Result<PathBuf, CheckpointError> {
    let (_, name) = split_dir(dir)?;
    let old = sibling(dir, &name, "old");
    if is_complete(dir) {
        Ok(dir.to_path_buf())
    } else if is_complete(&old) {
        Ok(old)
    } else {
        Err(CheckpointError::NotFound {
            dir: dir.to_path_buf(),
            old,
        })
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(|e| CheckpointError::io(path, "read", e))
}

fn read_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
    let bytes = read_file(path)?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::corrupt(path, e))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(CheckpointError::corrupt(
            path,
            format!(
                "format {:?} version {}, expected {FORMAT:?} version {VERSION}",
                manifest.format, manifest.version
            ),
        ));
    }
    Ok(manifest)
}

/// Reads `src/name` and checks it against its manifest entry.
fn read_checked(src: &Path, name: &str, manifest: &Manifest) -> Result<Vec<u8>, CheckpointError> {
    let path = src.join(name);
    let entry = manifest
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| {
            CheckpointError::corrupt(&src.join(MANIFEST_FILE), format!("no entry for {name}"))
        })?;
    let bytes = read_file(&path)?;
    if bytes.len() as u64 != entry.bytes {
        return Err(CheckpointError::corrupt(
            &path,
            format!("{} bytes, the manifest says {}", bytes.len(), entry.bytes),
        ));
    }
    let sum = format!("{:016x}", fnv1a64(&bytes));
    if sum != entry.fnv1a64 {
        return Err(CheckpointError::corrupt(
            &path,
            format!("checksum {sum}, the manifest says {}", entry.fnv1a64),
        ));
    }
    Ok(bytes)
}

fn parse_state(src: &Path, manifest: &Manifest) -> Result<TrainState, CheckpointError> {
    let bytes = read_checked(src, STATE_FILE, manifest)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::corrupt(&src.join(STATE_FILE), e))
}

/// Compares the model's tensors (paths and shapes) and architecture with
/// the manifest's; the error names the first difference and counts the rest.
fn check_model<M: Module + Display>(
    path: &Path,
    manifest: &Manifest,
    model: &M,
) -> Result<(), CheckpointError> {
    let ours = parameter_shapes(model);
    let mut diffs = Vec::new();
    for saved in &manifest.parameters {
        match ours.iter().find(|p| p.path == saved.path) {
            None => diffs.push(format!(
                "tensor `{}` {:?} is in the checkpoint but not in the model",
                saved.path, saved.shape
            )),
            Some(p) if p.shape != saved.shape => diffs.push(format!(
                "tensor `{}` has shape {:?} in the checkpoint but {:?} in the model",
                saved.path, saved.shape, p.shape
            )),
            Some(_) => {}
        }
    }
    for p in &ours {
        if !manifest.parameters.iter().any(|s| s.path == p.path) {
            diffs.push(format!(
                "tensor `{}` {:?} is in the model but not in the checkpoint",
                p.path, p.shape
            ));
        }
    }
    if diffs.is_empty() {
        let arch = model.to_string();
        if let Some(d) = first_line_difference(&manifest.architecture, &arch) {
            diffs.push(d);
        }
    }
    match diffs.len() {
        0 => Ok(()),
        1 => Err(CheckpointError::mismatch(path, &diffs[0])),
        n => Err(CheckpointError::mismatch(
            path,
            format!("{} (and {} more differences)", diffs[0], n - 1),
        )),
    }
}

fn first_line_difference(saved: &str, ours: &str) -> Option<String> {
    if saved == ours {
        return None;
    }
    let (mut a, mut b) = (saved.lines(), ours.lines());
    let mut line = 1;
    loop {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (x, y) => {
                return Some(format!(
                    "architecture differs at line {line}: checkpoint has `{}`, model has `{}`",
                    x.unwrap_or("<end>").trim(),
                    y.unwrap_or("<end>").trim()
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared pieces.

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    files: Vec<FileEntry>,
    parameters: Vec<TensorEntry>,
    architecture: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    fnv1a64: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct TensorEntry {
    path: String,
    shape: Vec<usize>,
}

/// Paths and shapes of every tensor of a module, as its record keys them
/// (module names joined by `.`), without initialising lazy parameters.
fn parameter_shapes<M: Module>(model: &M) -> Vec<TensorEntry> {
    struct Shapes {
        path: Vec<String>,
        out: Vec<TensorEntry>,
    }
    impl Shapes {
        fn push(&mut self, shape: burn::tensor::Shape) {
            self.out.push(TensorEntry {
                path: self.path.join("."),
                shape: shape.to_vec(),
            });
        }
    }
    impl ModuleVisitor for Shapes {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.push(param.lazy_shape());
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            self.push(param.lazy_shape());
        }
        fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, Bool>>) {
            self.push(param.lazy_shape());
        }
    }
    let mut visitor = Shapes {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}

/// `(parent, name)` of a checkpoint directory path.
fn split_dir(dir: &Path) -> Result<(PathBuf, OsString), CheckpointError> {
    let name = dir
        .file_name()
        .ok_or_else(|| CheckpointError::invalid(dir, "a checkpoint directory needs a name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// `dir.<suffix>` next to `dir`.
fn sibling(dir: &Path, name: &OsString, suffix: &str) -> PathBuf {
    let mut s = name.clone();
    s.push(".");
    s.push(suffix);
    dir.with_file_name(s)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn one_line(detail: impl Display) -> String {
    detail
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::TensorData;
    use burn::tensor::activation::relu;

    use crate::models::{RelationNetwork, RelationNetworkConfig};

    #[derive(Module, Debug)]
    struct TinyNet {
        conv: Conv2d,
        bn: BatchNorm,
        hidden: Vec<Linear>,
        out: Linear,
        tag: usize,
    }

    fn tiny(channels: usize, tag: usize, device: &Device) -> TinyNet {
        TinyNet {
            conv: Conv2dConfig::new([2, channels], [3, 3]).init(device),
            bn: BatchNormConfig::new(channels).init(device),
            hidden: vec![LinearConfig::new(channels * 4, 8).init(device)],
            out: LinearConfig::new(8, 3).init(device),
            tag,
        }
    }

    impl TinyNet {
        fn forward(&self, x: Tensor<4>) -> Tensor<2> {
            let h = relu(self.bn.forward(self.conv.forward(x)));
            let [n, c, hh, ww] = h.dims();
            let mut h = h.reshape([n, c * hh * ww]);
            for layer in &self.hidden {
                h = relu(layer.forward(h));
            }
            self.out.forward(h)
        }
    }

    /// A fixed input [2, 2, 4, 4].
    fn input(device: &Device) -> Tensor<4> {
        let v: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 5.0)
            .collect();
        Tensor::from_data(TensorData::new(v, [2, 2, 4, 4]), device)
    }

    fn adam() -> ModuleOptimizer {
        AdamConfig::new().init()
    }

    fn train_step(model: TinyNet, optim: &mut ModuleOptimizer, x: &Tensor<4>) -> TinyNet {
        let y = model.forward(x.clone());
        let loss = (y.clone() * y).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-2, model, grads)
    }

    /// Every tensor of a module (parameters and buffers) by path.
    fn values<M: Module>(model: &M) -> Vec<(String, Vec<f32>)> {
        struct Values {
            path: Vec<String>,
            out: Vec<(String, Vec<f32>)>,
        }
        impl ModuleVisitor for Values {
            fn enter_module(&mut self, name: &str, _container_type: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container_type: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let v = param.val().into_data().try_to_vec::<f32>().unwrap();
                self.out.push((self.path.join("."), v));
            }
        }
        // Sync pending running-state updates, or `visit` reads stale ones.
        let _ = model.valid();
        let mut visitor = Values {
            path: Vec::new(),
            out: Vec::new(),
        };
        model.visit(&mut visitor);
        visitor.out
    }

    fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut m = 0f32;
        for ((pa, va), (pb, vb)) in a.iter().zip(b) {
            assert_eq!(pa, pb);
            assert_eq!(va.len(), vb.len(), "{pa}");
            for (x, y) in va.iter().zip(vb) {
                m = m.max((x - y).abs());
            }
        }
        m
    }

    fn tensor_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// A fresh, empty scratch directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("moevqa-checkpoint-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A mid-epoch state's sums come back bit for bit, or a resumed
    /// epoch's loss would differ from an unstopped one's in the last digit.
    #[test]
    fn partial_epoch_sums_round_trip_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let p = PartialEpoch {
                loss_sum: rng.random::<f64>() * 10f64.powi(rng.random_range(-3..6)),
                score_sum: rng.random::<f64>() * 1e4,
                seconds: rng.random::<f64>() * 1e3,
                ..PartialEpoch::default()
            };
            let text = serde_json::to_string(&p).unwrap();
            let back: PartialEpoch = serde_json::from_str(&text).unwrap();
            assert_eq!(back.loss_sum.to_bits(), p.loss_sum.to_bits(), "{text}");
            assert_eq!(back.score_sum.to_bits(), p.score_sum.to_bits(), "{text}");
        }
    }

    fn state(epoch: usize) -> TrainState {
        TrainState {
            epoch,
            step: 10 * epoch as u64,
            seed: 42,
            metrics: serde_json::json!({ "best_accuracy": 0.25 * epoch as f64 }),
            partial: (epoch % 2 == 1).then_some(PartialEpoch {
                epoch,
                batches: 3,
                seen: 48,
                loss_sum: 1.5,
                score_sum: 20.0,
                seconds: 0.25,
            }),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn checkpoint_round_trip_restores_model_and_adam_state() {
        let device = Device::default().autodiff();
        device.seed(11);
        let x = input(&device);
        let mut optim_a = adam();
        let mut a = tiny(4, 7, &device);
        for _ in 0..2 {
            a = train_step(a, &mut optim_a, &x);
        }
        // Training-mode forwards moved the running statistics.
        let mean =
            a.bn.running_mean
                .value_sync()
                .abs()
                .sum()
                .into_scalar::<f32>();
        assert!(mean > 1e-4, "running mean did not move: {mean}");

        let root = scratch("round-trip");
        let dir = root.join("checkpoint");
        save_checkpoint(&dir, &a, &optim_a, &state(2)).unwrap();
        assert_eq!(
            names(&dir),
            [MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
        );
        assert_eq!(names(&root), ["checkpoint"], "no tmp or old left behind");

        let fresh = tiny(4, 7, &device);
        assert!(max_diff(&values(&a), &values(&fresh)) > 1e-3);
        let (mut b, mut optim_b, st) = load_checkpoint(&dir, fresh, adam(), &device).unwrap();
        assert_eq!(st, state(2));

        // (a) Every tensor, running statistics included, and the outputs.
        assert_eq!(max_diff(&values(&a), &values(&b)), 0.0);
        for (sa, sb) in [
            (
                a.bn.running_mean.value_sync(),
                b.bn.running_mean.value_sync(),
            ),
            (a.bn.running_var.value_sync(), b.bn.running_var.value_sync()),
        ] {
            assert!(tensor_diff(sa, sb) <= 1e-6);
        }
        let ya = a.valid().forward(x.clone().inner());
        let yb = b.valid().forward(x.clone().inner());
        assert!(tensor_diff(ya, yb) <= 1e-6);

        // (b) The Adam state: one more identical step from both pairs.
        // Control: the model restored, the optimizer not. (Loaded again
        // rather than cloned: clones share BatchNorm's running state.)
        let (control, _, _) = load_checkpoint(&dir, tiny(4, 7, &device), adam(), &device).unwrap();
        let control = train_step(control, &mut adam(), &x);
        a = train_step(a, &mut optim_a, &x);
        b = train_step(b, &mut optim_b, &x);
        let after = max_diff(&values(&a), &values(&b));
        assert!(
            after <= 1e-6,
            "restored optimizer steps differently: {after}"
        );
        let ya = a.forward(x.clone());
        let yb = b.forward(x.clone());
        assert!(tensor_diff(ya, yb) <= 1e-6);
        // A fresh Adam (moments lost) would have stepped differently.
        let lost = max_diff(&values(&a), &values(&control));
        assert!(lost > 1e-4, "the test cannot see lost moments: {lost}");

        fs::remove_dir_all(&root).unwrap();
    }

    /// A copy keeps what the source held when it was copied, through later
    /// saves to the source, and replaces an earlier copy atomically.
    #[test]
    fn a_copied_checkpoint_outlives_later_saves() {
        let device = Device::default().autodiff();
        device.seed(13);
        let x = input(&device);
        let mut optim = adam();
        let mut a = tiny(4, 7, &device);
        a = train_step(a, &mut optim, &x);
        let root = scratch("copy");
        let (src, dst) = (root.join("checkpoint"), root.join("best"));
        save_checkpoint(&src, &a, &optim, &state(2)).unwrap();
        copy_checkpoint(&src, &dst).unwrap();
        let kept = values(&a);
        a = train_step(a, &mut optim, &x);
        save_checkpoint(&src, &a, &optim, &state(4)).unwrap();
        let later = values(&a);
        assert!(max_diff(&kept, &later) > 1e-4);

        let (b, _, st) = load_checkpoint(&dst, tiny(4, 7, &device), adam(), &device).unwrap();
        assert_eq!(st, state(2));
        assert_eq!(max_diff(&values(&b), &kept), 0.0);
        // Copying again replaces it, leaving no tmp or old behind.
        copy_checkpoint(&src, &dst).unwrap();
        let (c, _, st) = load_checkpoint(&dst, tiny(4, 7, &device), adam(), &device).unwrap();
        assert_eq!(st, state(4));
        assert_eq!(max_diff(&values(&c), &later), 0.0);
        assert_eq!(names(&root), ["best", "checkpoint"]);
        assert!(matches!(
            copy_checkpoint(&root.join("none"), &dst),
            Err(CheckpointError::NotFound { .. })
        ));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn checkpoint_round_trip_of_a_relation_network() {
        let device = Device::default();
        device.seed(5);
        let small = |g_dim| {
            RelationNetworkConfig::new(20, 7, 6)
                .with_g_dim(g_dim)
                .with_f_dim(16)
                .with_question_dim(12)
                .with_gate_hidden(8)
                .init(&device)
                .unwrap()
        };
        let net: RelationNetwork = small(16);
        let ckpt = Checkpoint::of_run(&scratch("relation-network"));
        assert!(!ckpt.exists());
        ckpt.save(&net, &adam(), &state(1)).unwrap();
        assert!(ckpt.exists());
        assert_eq!(ckpt.train_state().unwrap(), state(1));

        let fresh = small(16);
        assert!(max_diff(&values(&net), &values(&fresh)) > 1e-3);
        let (loaded, _, st) = ckpt.load(fresh, adam(), &device).unwrap();
        assert_eq!(st, state(1));
        assert_eq!(max_diff(&values(&net), &values(&loaded)), 0.0);

        let err = ckpt
            .load(small(24), adam(), &device)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Mismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("g_first_i.weight") && msg.contains("[26, 16]"),
            "{msg}"
        );

        fs::remove_dir_all(ckpt.dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn checkpoint_of_another_configuration_is_refused() {
        let device = Device::default();
        let root = scratch("mismatch");
        let dir = root.join("checkpoint");
        save_checkpoint(&dir, &tiny(4, 7, &device), &adam(), &state(1)).unwrap();

        let err = load_checkpoint(&dir, tiny(6, 7, &device), adam(), &device)
            .map(|_| ())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CheckpointError::Mismatch { .. }), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains(&dir.join(MODEL_FILE).display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains("`conv.weight` has shape [4, 2, 3, 3] in the checkpoint but [6, 2, 3, 3]"),
            "{msg}"
        );
        assert!(msg.contains("more differences"), "{msg}");

        // Same tensors, another constant: caught by the architecture.
        let err = load_checkpoint(&dir, tiny(4, 8, &device), adam(), &device)
            .map(|_| ())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CheckpointError::Mismatch { .. }), "{msg}");
        assert!(msg.contains("architecture") && msg.contains("tag"), "{msg}");

        // Another module altogether.
        let other = LinearConfig::new(3, 3).init(&device);
        let err = load_checkpoint(&dir, other, adam(), &device)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Mismatch { .. }), "{err}");

        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn checkpoint_recovers_after_a_save_killed_mid_swap() {
        let device = Device::default();
        let root = scratch("recovery");
        let dir = root.join("checkpoint");
        let old = root.join("checkpoint.old");
        let net1 = tiny(4, 7, &device);
        save_checkpoint(&dir, &net1, &adam(), &state(1)).unwrap();

        // Killed between the renames: only `dir.old` and a complete-looking tmp.
        fs::rename(&dir, &old).unwrap();
        let junk = root.join("checkpoint.tmp-999999");
        fs::create_dir(&junk).unwrap();
        fs::write(junk.join(MODEL_FILE), b"partial").unwrap();
        assert!(has_checkpoint(&dir));
        let (loaded, _, st) = load_checkpoint(&dir, tiny(4, 7, &device), adam(), &device).unwrap();
        assert_eq!(st, state(1));
        assert_eq!(max_diff(&values(&net1), &values(&loaded)), 0.0);
        assert_eq!(load_train_state(&dir).unwrap(), state(1));

        // The next save completes the swap and cleans up.
        let net2 = tiny(4, 7, &device);
        save_checkpoint(&dir, &net2, &adam(), &state(2)).unwrap();
        assert_eq!(names(&root), ["checkpoint"]);
        let (loaded, _, st) = load_checkpoint(&dir, tiny(4, 7, &device), adam(), &device).unwrap();
        assert_eq!(st, state(2));
        assert_eq!(max_diff(&values(&net2), &values(&loaded)), 0.0);

        // Killed before removing `dir.old`: `dir` is the newer one.
        let elsewhere = root.join("elsewhere");
        save_checkpoint(&elsewhere, &net1, &adam(), &state(1)).unwrap();
        fs::rename(&elsewhere, &old).unwrap();
        assert_eq!(load_train_state(&dir).unwrap(), state(2));

        // An incomplete `dir` (no manifest) never counts; `dir.old` does.
        fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        assert_eq!(load_train_state(&dir).unwrap(), state(1));
        save_checkpoint(&dir, &net2, &adam(), &state(3)).unwrap();
        assert_eq!(names(&root), ["checkpoint"]);
        assert_eq!(load_train_state(&dir).unwrap(), state(3));

        // Nothing at all.
        fs::remove_dir_all(&dir).unwrap();
        assert!(!has_checkpoint(&dir));
        let err = load_checkpoint(&dir, tiny(4, 7, &device), adam(), &device)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&dir.display().to_string()));

        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn checkpoint_errors_name_the_file() {
        let device = Device::default().autodiff();
        let x = input(&device);
        let mut optim = adam();
        let net = train_step(tiny(4, 7, &device), &mut optim, &x);
        let root = scratch("errors");
        let dir = root.join("checkpoint");
        let fresh_save = || {
            let _ = fs::remove_dir_all(&dir);
            save_checkpoint(&dir, &net, &optim, &state(1)).unwrap();
        };
        let load = || load_checkpoint(&dir, tiny(4, 7, &device), adam(), &device).map(|_| ());
        let expect = |err: CheckpointError, file: &str, what: &str| {
            let msg = err.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.contains(&dir.join(file).display().to_string()), "{msg}");
            assert!(msg.contains(what), "{msg}");
        };

        // A missing file.
        fresh_save();
        fs::remove_file(dir.join(OPTIMIZER_FILE)).unwrap();
        let err = load().unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
        expect(err, OPTIMIZER_FILE, "cannot read");

        // A flipped byte, and a truncated file.
        for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            fresh_save();
            let path = dir.join(file);
            let mut bytes = fs::read(&path).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x10;
            fs::write(&path, &bytes).unwrap();
            let err = load().unwrap_err();
            assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
            expect(err, file, "checksum");

            bytes.truncate(mid);
            fs::write(&path, &bytes).unwrap();
            let err = load().unwrap_err();
            expect(err, file, "bytes");
        }

        // Garbage that passes the checksum (manifest rewritten to match) is
        // still refused by the decoders, not a panic.
        for file in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            for garbage in [
                &b"BPK garbage, not a burnpack file at all"[..],
                b"",
                b"\0\0\0\0",
            ] {
                fresh_save();
                fs::write(dir.join(file), garbage).unwrap();
                let manifest_path = dir.join(MANIFEST_FILE);
                let mut m: serde_json::Value =
                    serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
                for entry in m["files"].as_array_mut().unwrap() {
                    if entry["name"] == file {
                        entry["bytes"] = garbage.len().into();
                        entry["fnv1a64"] = format!("{:016x}", fnv1a64(garbage)).into();
                    }
                }
                fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
                let err = load().unwrap_err();
                assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
                expect(err, file, "corrupt");
            }
        }

        // A damaged manifest.
        fresh_save();
        fs::write(dir.join(MANIFEST_FILE), b"{\"format\": ").unwrap();
        let err = load().unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        expect(err, MANIFEST_FILE, "corrupt");

        // An unwritable location: the parent is a plain file. (Tests run as
        // root here, so a read-only mode bit would not stop the write.)
        let blocker = root.join("not-a-directory");
        fs::write(&blocker, b"x").unwrap();
        let err =
            save_checkpoint(&blocker.join("checkpoint"), &net, &optim, &state(1)).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
        assert!(
            err.to_string().contains(&blocker.display().to_string()),
            "{err}"
        );

        // A failed save leaves the previous checkpoint in place.
        fresh_save();
        assert!(save_checkpoint(Path::new("/"), &net, &optim, &state(9)).is_err());
        assert_eq!(load_train_state(&dir).unwrap(), state(1));

        fs::remove_dir_all(&root).unwrap();
    }
}
