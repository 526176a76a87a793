//! CUDA graphs for decode steps.
//!
//! A decode step launches a few hundred small kernels (about ten per layer); at batch 1 the time
//! the host spends launching them can exceed the time the device spends running them. So the
//! first decode step of each batch-size bucket runs eagerly, then the same forward pass is
//! captured once into a graph (`cuStreamBeginCapture` .. `cuStreamEndCapture`), and later steps of
//! that bucket replay it with one `cuGraphLaunch`.
//!
//! What makes a replay compute the new step:
//! - the batch is padded to the bucket's size and block-table width ([`pad_decode`]); padding
//!   tokens have slot [`PAD_SLOT`], so their keys and values are never written, and their logits
//!   rows are dropped;
//! - the graph owns its metadata buffers (pinned staging and device copy, fixed addresses): its
//!   first node copies the staging buffer to the device, so a replay packs the new step into the
//!   same staging buffer and launches;
//! - every op of the forward pass reads token ids, positions, slots, block tables and logits rows
//!   from that copy (the model calls `prepare_batch` first), and allocates its activations from
//!   the graph's own memory (allocations made during capture become graph memory nodes, freed
//!   inside the graph); the logits end in a buffer the graph writes last;
//! - attention is captured with as many KV splits as the longest context the block-table width
//!   allows (the kernel cuts each token's own context into that many ranges on the device);
//! - M-RoPE (Glm4v) decode steps are captured too: their `[t, h, w]` positions are packed into the
//!   graph's metadata with the rest (padding tokens get `[0, 0, 0]`, harmless as their slot is
//!   [`PAD_SLOT`]), and the rope kernel reads them from there. Whether a step carries M-RoPE
//!   positions is part of the graph's key, as the packed layout differs.
//!
//! Steps that write image features over embedding rows (`Backend::copy_rows`, the copy's source
//! being that step's own encoder output) must not replay a graph, which would skip the copy. A
//! decode-shaped step can hold an image placeholder: a prompt ending in one, whose final chunk is
//! that single token (after a prefix-cache hit or chunking). Such a step is told by its M-RoPE
//! positions ([`has_image_positions`]) and runs eagerly; one that slips through (the single
//! placeholder of a 1 x 1-token image sits at `[p, p, p]` like text) is at least never captured,
//! as its eager pass counts a `copy_rows`, but a graph captured earlier for its shape would replay
//! without the copy. The engine knows which steps have image rows; the trait does not tell.
//!
//! The ops' host-side checks do not run on a replay, so the replay repeats the ones that guard
//! memory (`check_batch`, token ids inside the vocabulary) before launching. Graphs are keyed by
//! (bucket, block-table width, KV cache); one model per cache. A capture that fails turns graphs
//! off for the backend (the step has its eager result already) and says so on stderr.
//! `CudaOptions::graphs = false` (`--enforce-eager`) never captures.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use cudarc::driver::{sys, CudaEvent, CudaGraph, CudaSlice};

use super::ops::check_batch;
use super::{driver_err, meta, CudaBackend, CudaKvCache, CudaTensor, DeviceBatch};
use crate::backend::ForwardFn;
use crate::error::{Error, Result};
use crate::runner::ForwardBatch;

/// The slot of a padding token: its key and value are not written (vLLM's `PAD_SLOT_ID`).
pub(crate) const PAD_SLOT: u32 = u32::MAX;

/// Largest decode batch that is captured; larger ones run eagerly (their launches are a small
/// part of a step that long).
pub(crate) const MAX_GRAPH_BATCH: usize = 256;

/// The batch size a decode step of `n` sequences is padded to: 1, 2, 4, 8, then multiples of 8
/// up to 64, of 16 up to 128 and of 32 up to [`MAX_GRAPH_BATCH`] (19 sizes; padding adds at most
/// a quarter); `None` when `n` is 0 or larger than that.
pub(crate) fn bucket(n: usize) -> Option<usize> {
    match n {
        0 => None,
        1..=8 => Some(n.next_power_of_two()),
        9..=64 => Some(n.div_ceil(8) * 8),
        65..=128 => Some(n.div_ceil(16) * 16),
        _ if n <= MAX_GRAPH_BATCH => Some(n.div_ceil(32) * 32),
        _ => None,
    }
}

/// The block-table width a graph is captured with: a power of two, at least 8, so contexts
/// growing by a block do not each need a graph of their own.
pub(crate) fn table_width(max_blocks_per_seq: usize) -> usize {
    max_blocks_per_seq.max(8).next_power_of_two()
}

/// Whether `batch` is a plain decode step: one token per sequence, each one's logits asked for,
/// in order.
pub(crate) fn is_decode(batch: &ForwardBatch) -> bool {
    let n = batch.num_seqs();
    n > 0
        && batch.num_tokens() == n
        && batch
            .query_start
            .iter()
            .enumerate()
            .all(|(i, &q)| q as usize == i)
        && batch.logits_indices.len() == n
        && batch
            .logits_indices
            .iter()
            .enumerate()
            .all(|(i, &r)| r as usize == i)
}

/// Whether a token of `batch` has M-RoPE positions that are not `[p, p, p]`: an image
/// placeholder (text and generated tokens advance all three streams together).
pub(crate) fn has_image_positions(batch: &ForwardBatch) -> bool {
    batch
        .mrope_positions
        .chunks(3)
        .any(|p| p.len() != 3 || p[0] != p[1] || p[0] != p[2])
}

/// `batch` (a decode step of at most `bucket` sequences, block tables at most `width` wide)
/// padded to `bucket` sequences with `width` block-table entries each, into `out` (cleared
/// first; its buffers are reused). A padding sequence has one token: id 0 at position 0 (M-RoPE
/// positions `[0, 0, 0]` when the batch has them) with slot [`PAD_SLOT`], context length 1 and a
/// block table of zeros (it reads, never writes, the first cache slot); its logits row is
/// computed and ignored.
pub(crate) fn pad_decode(
    batch: &ForwardBatch,
    bucket: usize,
    width: usize,
    out: &mut ForwardBatch,
) {
    let n = batch.num_tokens();
    debug_assert!(is_decode(batch) && n <= bucket && batch.max_blocks_per_seq <= width);
    out.max_blocks_per_seq = width;
    out.token_ids.clear();
    out.token_ids.extend_from_slice(&batch.token_ids);
    out.token_ids.resize(bucket, 0);
    out.positions.clear();
    out.positions.extend_from_slice(&batch.positions);
    out.positions.resize(bucket, 0);
    out.slot_mapping.clear();
    out.slot_mapping.extend_from_slice(&batch.slot_mapping);
    out.slot_mapping.resize(bucket, PAD_SLOT);
    out.query_start.clear();
    out.query_start.extend(0..=bucket as u32);
    out.context_lens.clear();
    out.context_lens.extend_from_slice(&batch.context_lens);
    out.context_lens.resize(bucket, 1);
    out.block_tables.clear();
    for s in 0..n {
        out.block_tables.extend_from_slice(batch.block_table(s));
        out.block_tables.resize((s + 1) * width, 0);
    }
    out.block_tables.resize(bucket * width, 0);
    out.logits_indices.clear();
    out.logits_indices.extend(0..bucket as u32);
    out.mrope_positions.clear();
    if !batch.mrope_positions.is_empty() {
        out.mrope_positions
            .extend_from_slice(&batch.mrope_positions);
        out.mrope_positions.resize(3 * bucket, 0);
    }
}

/// (bucket, block-table width, KV cache id, whether the steps carry M-RoPE positions).
type GraphKey = (usize, usize, u64, bool);

/// Most graphs kept per backend; the least recently replayed one goes first. Each holds the
/// memory of its own activations (graph memory nodes), outside the KV-cache budget.
const MAX_GRAPHS: usize = 48;

/// One captured decode step.
pub(super) struct DecodeGraph {
    graph: CudaGraph,
    /// The graph's metadata buffers, read by its nodes at fixed addresses.
    batch: DeviceBatch,
    /// Where `batch.staging` was when the graph was captured.
    staging_at: usize,
    /// The padded step being replayed (its buffers are reused).
    padded: ForwardBatch,
    /// Logits width; the graph's last node writes `bucket` rows into `Graphs::logits[cols]`.
    cols: usize,
    bucket: usize,
    width: usize,
    /// Rows of the embedding table the capture read ids from (replays check ids against it).
    vocab: usize,
    /// Gone once the KV cache the graph writes into is dropped (the graph is then dropped too).
    cache_alive: Weak<()>,
    /// Recorded after each launch: the staging buffer is rewritten only once the launch before
    /// has copied it.
    launched: CudaEvent,
    last_used: u64,
}

// SAFETY: CUDA graph objects may be used from any thread as long as no two threads use one at
// the same time (the driver API's thread-safety rules for graphs); a `DecodeGraph` is reached only
// through the backend's `Mutex<Graphs>`, and `CudaGraph::launch` binds the context first.
unsafe impl Send for DecodeGraph {}

/// The captured graphs of a backend.
#[derive(Default)]
pub(super) struct Graphs {
    /// By (bucket, block-table width, KV cache id, M-RoPE positions or not).
    by_key: HashMap<GraphKey, DecodeGraph>,
    /// Where graphs leave their logits, one `MAX_GRAPH_BATCH x cols` buffer per logits width,
    /// shared (replays and the copies out of it are ordered on the one stream).
    logits: HashMap<usize, CudaSlice<f32>>,
    /// Whether decode steps go through graphs (`CudaOptions::graphs`, `set_graphs`).
    enabled: bool,
    /// Set when a capture failed: every step runs eagerly from then on.
    off: bool,
    /// Steps replayed or captured so far (the LRU clock).
    clock: u64,
}

impl Graphs {
    pub(super) fn new(enabled: bool) -> Graphs {
        Graphs {
            enabled,
            ..Default::default()
        }
    }

    /// Makes room for one more graph: drops graphs of caches that are gone, then the least
    /// recently used while there are `MAX_GRAPHS` or more.
    fn make_room(&mut self) {
        self.by_key.retain(|_, g| g.cache_alive.strong_count() > 0);
        while self.by_key.len() >= MAX_GRAPHS {
            let oldest = self
                .by_key
                .iter()
                .min_by_key(|(_, g)| g.last_used)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => self.by_key.remove(&k),
                None => break,
            };
        }
    }
}

type Forward<'a> = ForwardFn<'a, CudaBackend>;

impl CudaBackend {
    /// `Backend::run_step` of the CUDA backend: decode steps through graphs, the rest eagerly.
    pub(super) fn run_step_graphs(
        &self,
        batch: &ForwardBatch,
        cache: &mut CudaKvCache,
        forward: &mut Forward<'_>,
    ) -> Result<CudaTensor> {
        let bucket = match bucket(batch.num_seqs()) {
            Some(b) if is_decode(batch) && !has_image_positions(batch) => b,
            _ => return forward(batch, cache),
        };
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| Error::Backend("decode graphs lock poisoned".into()))?;
        if graphs.off || !graphs.enabled {
            drop(graphs);
            return forward(batch, cache);
        }
        // Padding and replays index the batch before any op would check it.
        check_batch(batch, &cache.shape)?;
        let width = table_width(batch.max_blocks_per_seq);
        let key = (bucket, width, cache.id, !batch.mrope_positions.is_empty());
        graphs.clock += 1;
        let now = graphs.clock;
        let Graphs { by_key, logits, .. } = &mut *graphs;
        if let Some(g) = by_key.get_mut(&key) {
            g.last_used = now;
            let out = logits
                .get(&g.cols)
                .ok_or_else(|| Error::Backend("decode graph logits buffer missing".into()))?;
            return self.replay(g, out, batch);
        }
        // First step of this shape: run it eagerly, padded as the graph will be (so the kernels
        // and cuBLAS's choices for these shapes are loaded before the capture), keep its result,
        // then record the same pass.
        let mut padded = ForwardBatch::new(width);
        pad_decode(batch, bucket, width, &mut padded);
        let row_copies = self.row_copies();
        let full = forward(&padded, cache)?;
        let out = self.leading_rows(&full.data, batch.num_tokens(), full.cols)?;
        let cols = full.cols;
        drop(full);
        if self.row_copies() != row_copies {
            // Image features were copied in: a replay could not repeat that step's copy.
            return Ok(out);
        }
        graphs.make_room();
        match self.capture(&mut graphs, padded, cache, forward, cols, bucket) {
            Ok(mut g) => {
                g.last_used = now;
                graphs.by_key.insert(key, g);
            }
            Err(e) => {
                tracing::warn!(
                    target: "autoglm::cuda",
                    batch = bucket,
                    error = %e,
                    "capturing the decode graph failed; decode steps run without CUDA graphs from now on"
                );
                graphs.off = true;
                graphs.by_key.clear();
            }
        }
        Ok(out)
    }

    /// Records `forward` on `padded` into a graph whose last node copies the logits into the
    /// shared logits buffer for `cols`.
    fn capture(
        &self,
        graphs: &mut Graphs,
        padded: ForwardBatch,
        cache: &mut CudaKvCache,
        forward: &mut Forward<'_>,
        cols: usize,
        bucket: usize,
    ) -> Result<DecodeGraph> {
        let what = "decode graph capture";
        // Buffers the graph reads and writes are made before the capture: an allocation made
        // during it belongs to the graph and is freed by it.
        let logits = match graphs.logits.entry(cols) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.alloc::<f32>(MAX_GRAPH_BATCH * cols, "decode graph logits")?)
            }
        };
        let mut db = DeviceBatch::new(self, true)?;
        db.layout = meta::pack(&padded, &mut db.staging);
        if !db.staging.is_pinned() {
            return Err(Error::Backend(format!(
                "{what}: no pinned memory left for the graph's metadata"
            )));
        }
        db.meta = self.alloc::<u32>(db.staging.len(), "decode graph metadata")?;
        let launched = self.stream.record_event(None).map_err(driver_err(what))?;
        let lock = || self.lock_batch(what);
        // The ops find the graph's buffers in the backend's batch slot during the capture.
        let eager = lock()?.replace(db);
        let begun = self
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err(what));
        let recorded = begun.and_then(|()| {
            // A panic inside the pass must not leave the stream capturing.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let t = forward(&padded, cache)?;
                if t.rows != bucket || t.cols != cols {
                    return Err(Error::Backend(format!(
                        "{what}: logits of {}x{} instead of {bucket}x{cols}",
                        t.rows, t.cols
                    )));
                }
                self.stream
                    .memcpy_dtod(
                        &t.data.slice(0..bucket * cols),
                        &mut logits.slice_mut(0..bucket * cols),
                    )
                    .map_err(driver_err(what))
            }))
            .unwrap_or_else(|_| Err(Error::Backend(format!("{what}: the forward pass panicked"))))
        });
        let graph = self.end_capture(what);
        let db = std::mem::replace(&mut *lock()?, eager)
            .ok_or_else(|| Error::Backend(format!("{what}: the graph's metadata went missing")))?;
        recorded?;
        let graph = graph?;
        if db.embed_rows == 0 || !db.uploaded {
            return Err(Error::Backend(format!(
                "{what}: the forward pass did not read the batch from the graph's metadata"
            )));
        }
        graph.upload().map_err(driver_err(what))?;
        Ok(DecodeGraph {
            graph,
            vocab: db.embed_rows,
            staging_at: db.staging.as_ptr() as usize,
            batch: db,
            width: padded.max_blocks_per_seq,
            padded,
            cols,
            bucket,
            cache_alive: Arc::downgrade(&cache.alive),
            launched,
            last_used: 0,
        })
    }

    /// Ends the stream's capture whatever happened during it. An error a dropped buffer stored
    /// in the context while the capture was failing is cleared first (cudarc would report it
    /// instead of ending the capture, leaving the stream capturing for good).
    fn end_capture(&self, what: &str) -> Result<CudaGraph> {
        let stored = self.ctx.check_err().err();
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let _ = self.ctx.check_err();
        let capturing = self.stream.capture_status().map_err(driver_err(what))?;
        if capturing != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            // SAFETY: ends the capture of this backend's own stream; the graph it returns (if
            // any) is discarded by the driver call's failure or leaked, never launched.
            let _ = unsafe { cudarc::driver::result::stream::end_capture(self.stream.cu_stream()) };
            return Err(Error::Backend(format!(
                "{what}: the stream could not leave capture mode ({capturing:?})"
            )));
        }
        match (ended, stored) {
            (Ok(Some(g)), None) => Ok(g),
            (Ok(Some(_)), Some(e)) | (Err(_), Some(e)) => Err(driver_err(what)(e)),
            (Ok(None), _) => Err(Error::Backend(format!("{what}: empty graph"))),
            (Err(e), None) => Err(driver_err(what)(e)),
        }
    }

    /// Replays `g` for `batch` (checked by the caller): the new step packed into the graph's
    /// staging buffer, the vocabulary check the embedding op would have made, one launch, then
    /// the step's logits rows copied out of `logits`.
    fn replay(
        &self,
        g: &mut DecodeGraph,
        logits: &CudaSlice<f32>,
        batch: &ForwardBatch,
    ) -> Result<CudaTensor> {
        let what = "decode graph replay";
        if let Some(&id) = batch.token_ids.iter().find(|&&id| id as usize >= g.vocab) {
            return Err(Error::InvalidRequest(format!(
                "token id {id} is outside the vocabulary ({})",
                g.vocab
            )));
        }
        g.launched.synchronize().map_err(driver_err(what))?;
        pad_decode(batch, g.bucket, g.width, &mut g.padded);
        let layout = meta::pack(&g.padded, &mut g.batch.staging);
        if layout != g.batch.layout || g.batch.staging.as_ptr() as usize != g.staging_at {
            return Err(Error::Backend(format!(
                "{what}: the step's metadata does not fit the captured layout"
            )));
        }
        g.graph.launch().map_err(driver_err(what))?;
        g.launched.record(&self.stream).map_err(driver_err(what))?;
        self.leading_rows(logits, batch.num_tokens(), g.cols)
    }

    /// Turns decode graphs on or off from the next step (for A/B measurements; graphs already
    /// captured are kept). A backend whose capture failed stays off.
    pub fn set_graphs(&self, on: bool) {
        if let Ok(mut g) = self.graphs.lock() {
            g.enabled = on;
        }
    }

    /// A new `rows x cols` tensor holding the first rows of `src`.
    fn leading_rows(&self, src: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<CudaTensor> {
        let mut out = self.tensor(rows, cols, "step logits")?;
        let n = rows * cols;
        if n > 0 {
            if src.len() < n {
                return Err(Error::Backend(format!(
                    "step logits: {} values for {rows}x{cols}",
                    src.len()
                )));
            }
            self.stream
                .memcpy_dtod(&src.slice(0..n), &mut out.data)
                .map_err(driver_err("step logits"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::KvCacheShape;

    /// Three decode sequences (block size 4) with block tables of 2, 1 and 3 blocks.
    fn decode() -> ForwardBatch {
        let mut b = ForwardBatch::new(3);
        b.push_seq(&[11], 5, &[7, 2], 4);
        b.push_seq(&[12], 0, &[4], 4);
        b.push_seq(&[13], 9, &[1, 3, 5], 4);
        b.logits_indices.extend_from_slice(&[0, 1, 2]);
        b
    }

    #[test]
    fn buckets_cover_every_batch_up_to_the_largest_with_few_sizes() {
        assert_eq!(bucket(0), None);
        assert_eq!(bucket(MAX_GRAPH_BATCH + 1), None);
        let mut sizes = std::collections::BTreeSet::new();
        for n in 1..=MAX_GRAPH_BATCH {
            let b = bucket(n).unwrap();
            assert!(b >= n && b <= MAX_GRAPH_BATCH, "{n} -> {b}");
            assert_eq!(bucket(b), Some(b), "a bucket is its own bucket");
            // Padding wastes at most a quarter of a large batch.
            assert!(n <= 8 || b - n < n.div_ceil(4).max(8), "{n} -> {b}");
            sizes.insert(b);
        }
        assert_eq!(sizes.len(), 19, "{sizes:?}");
        assert_eq!(table_width(1), 8);
        assert_eq!(table_width(9), 16);
        assert_eq!(table_width(16), 16);
    }

    #[test]
    fn only_plain_decode_steps_take_a_graph() {
        assert!(is_decode(&decode()));
        let mut prefill = ForwardBatch::new(2);
        prefill.push_seq(&[1, 2, 3], 0, &[0], 4);
        prefill.logits_indices.push(2);
        assert!(!is_decode(&prefill));
        let mut partial = decode();
        partial.logits_indices.clear();
        partial.logits_indices.extend_from_slice(&[0, 2]);
        assert!(!is_decode(&partial), "a row without logits");
        let mut reordered = decode();
        reordered.logits_indices.clear();
        reordered.logits_indices.extend_from_slice(&[1, 0, 2]);
        assert!(!is_decode(&reordered));
        assert!(!is_decode(&ForwardBatch::new(1)), "empty");
    }

    #[test]
    fn padding_keeps_the_real_rows_and_adds_rows_that_write_nothing() {
        let b = decode();
        let mut out = ForwardBatch::new(1);
        // Stale content from a larger step must go.
        pad_decode(&b, 8, 8, &mut out);
        pad_decode(&b, 4, 8, &mut out);
        assert_eq!(out.max_blocks_per_seq, 8);
        assert_eq!(&out.token_ids[..], &[11, 12, 13, 0]);
        assert_eq!(&out.positions[..], &[5, 0, 9, 0]);
        assert_eq!(
            &out.slot_mapping[..],
            &[2 * 4 + 1, 4 * 4, 5 * 4 + 1, PAD_SLOT]
        );
        assert_eq!(&out.query_start[..], &[0, 1, 2, 3, 4]);
        assert_eq!(&out.context_lens[..], &[6, 1, 10, 1]);
        assert_eq!(&out.logits_indices[..], &[0, 1, 2, 3]);
        assert_eq!(out.block_table(0), &[7, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out.block_table(1), &[4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out.block_table(2), &[1, 3, 5, 0, 0, 0, 0, 0]);
        assert_eq!(out.block_table(3), &[0; 8]);
        assert!(is_decode(&out));
        // The padded batch passes the kernels' memory checks; a real slot outside the cache
        // still does not.
        let cache = KvCacheShape {
            num_layers: 1,
            num_blocks: 8,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 2,
        };
        check_batch(&out, &cache).unwrap();
        let mut bad = out.clone();
        bad.slot_mapping[3] = PAD_SLOT - 1;
        assert!(check_batch(&bad, &cache).is_err());
        // The same shape packs to the same layout: what a replay relies on.
        let mut staging = crate::memory::HostVec::default();
        let first = meta::pack(&out, &mut staging);
        let mut other = decode();
        other.token_ids[1] = 99;
        other.positions[1] = 3;
        other.slot_mapping[1] = 4 * 4 + 3;
        other.context_lens[1] = 4;
        pad_decode(&other, 4, 8, &mut out);
        assert_eq!(meta::pack(&out, &mut staging), first);
        assert!(out.mrope_positions.is_empty(), "1-D rope: none added");
    }

    #[test]
    fn mrope_positions_are_padded_with_the_rows_and_keep_the_layout() {
        let mut b = decode();
        b.mrope_positions = vec![2, 2, 2, 0, 0, 0, 7, 7, 7].into();
        let mut out = ForwardBatch::new(1);
        pad_decode(&b, 4, 8, &mut out);
        assert_eq!(
            &out.mrope_positions[..],
            &[2, 2, 2, 0, 0, 0, 7, 7, 7, 0, 0, 0]
        );
        assert_eq!(&out.positions[..], &[5, 0, 9, 0], "positions untouched");
        let cache = KvCacheShape {
            num_layers: 1,
            num_blocks: 8,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 2,
        };
        check_batch(&out, &cache).unwrap();
        let mut staging = crate::memory::HostVec::default();
        let first = meta::pack(&out, &mut staging);
        assert_eq!(
            &staging[first.mrope_positions.clone()],
            &out.mrope_positions[..]
        );
        // The next step (new positions, same shape) packs to the same layout: a replay.
        let mut next = b.clone();
        next.mrope_positions[0..3].copy_from_slice(&[3, 3, 3]);
        pad_decode(&next, 4, 8, &mut out);
        assert_eq!(meta::pack(&out, &mut staging), first);
        assert!(!has_image_positions(&out), "text positions only");
        let mut image = b.clone();
        image.mrope_positions[3..6].copy_from_slice(&[4, 5, 6]);
        assert!(
            has_image_positions(&image),
            "an image placeholder's [t, h, w]"
        );
        assert!(!has_image_positions(&decode()));
        // A step without M-RoPE positions after one with them leaves none behind.
        pad_decode(&decode(), 4, 8, &mut out);
        assert!(out.mrope_positions.is_empty());
        assert_ne!(meta::pack(&out, &mut staging), first);
    }
}
