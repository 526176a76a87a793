//! The engine thread: schedule -> forward -> sample -> emit, until shut down.

use foldhash::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::block_manager::BlockManager;
use super::encoder::{self, EncodeJob, Encoded, Encoder};
use super::encoder_cache::EncoderCache;
use super::events::{EventSender, Sent};
use super::grammar::{apply_mask, GrammarSlot};
use super::scheduler::{Scheduler, SchedulerOutput};
use super::sequence::{PromptImages, SeqId, Sequence};
use super::stats_log::StatsLog;
use super::{Command, EngineStats, Request, RequestId, RequestOutput, Usage};
use crate::backend::{Backend, RowSampling};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::memory::{PinnedPool, PinnedPoolConfig};
use crate::model::vision::ImageRows;
use crate::model::GlmModel;
use crate::runner::{BatchShape, ForwardBatch};
use crate::sampling::{self, FinishReason, SamplerState};
use crate::threading;
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer};

pub(crate) struct NewRequest {
    pub(crate) id: RequestId,
    pub(crate) req: Request,
    pub(crate) tx: EventSender,
    /// The prompt's images laid out (checked on the submitting thread).
    pub(crate) images: Option<Arc<PromptImages>>,
    /// One matcher per choice when the request has a structured-output grammar (compiled on
    /// the submitting thread).
    pub(crate) grammars: Vec<llguidance::Matcher>,
}

struct RequestState {
    tx: EventSender,
    req: Request,
    seqs: Vec<SeqId>,
    choices_left: usize,
    usage: Usage,
    /// Generation stops at this many output tokens (max_tokens capped by the context length).
    max_output: usize,
    /// The request's stop strings, ready to match.
    stops: sampling::StopStrings,
}

/// Output processing of one choice.
struct ChoiceState {
    request: RequestId,
    index: usize,
    sampler: SamplerState,
    detok: Option<IncrementalDetokenizer>,
    /// The structured-output grammar's state, when the request has one.
    grammar: Option<GrammarSlot>,
    /// Text decoded so far and how much of it was emitted.
    text: String,
    emitted: usize,
    first_schedule: bool,
}

struct Core<B: Backend> {
    backend: B,
    model: GlmModel<B>,
    cache: B::KvCache,
    tokenizer: Option<Arc<Tokenizer>>,
    scheduler: Scheduler,
    requests: HashMap<RequestId, RequestState>,
    choices: HashMap<SeqId, ChoiceState>,
    next_seq: SeqId,
    arrivals: u64,
    seed_rng: SamplerState,
    max_model_len: usize,
    eos: Vec<u32>,
    /// The end-of-sequence id of structured-output masks.
    grammar_eos: u32,
    stats: Arc<EngineStats>,
    logits_scratch: Vec<f32>,
    /// The sampled rows' parameters for a backend that samples on the device, and the tokens it
    /// returns (both reused across steps).
    row_sampling: Vec<RowSampling>,
    sampled_ids: Vec<u32>,
    /// Page-locked buffers each step's batch is built in (reused across steps).
    pinned: PinnedPool,
    /// Encoded image features by image content hash.
    encoder_cache: EncoderCache<B::Tensor>,
    /// Where images are encoded (a thread of its own, or this one between steps).
    encoder: Encoder<B>,
    /// Images queued or being encoded, by content hash.
    pending: HashMap<u64, PendingImage>,
    /// The images each sequence in prefill still has ahead of it (pinned in the cache).
    image_pins: HashMap<SeqId, Vec<PinnedImage>>,
    /// Scratch for the scheduler's encoder waits.
    waits_scratch: Vec<(usize, usize)>,
    /// Requests held back because their stream's queue is full, until it is taken.
    paused: HashSet<RequestId>,
    /// The periodic stats line; `None` when off.
    stats_log: Option<StatsLog>,
}

struct PendingImage {
    /// Feature rows it will have.
    tokens: usize,
    cancelled: Arc<AtomicBool>,
}

/// An image a sequence has yet to prefill: its content hash and placeholder range.
struct PinnedImage {
    hash: u64,
    start: usize,
    end: usize,
}

/// What one [`Core::step`] came to.
#[derive(PartialEq)]
enum Progress {
    Ran,
    /// Nothing could run until an image comes back from the encoder thread.
    WaitingForEncoder,
    /// Nothing could run until a paused request's stream takes its events (or it is cancelled).
    WaitingForStreams,
}

/// Where one scheduled chunk takes rows of an image's features: the image's content hash and
/// the rows ([`ImageRows`] without the tensor).
struct ImageSpan {
    hash: u64,
    src_row: usize,
    dst_row: usize,
    len: usize,
}

/// Memory the OS says is available, in bytes (Linux), if known.
fn mem_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Device memory one step's activations may take, kept out of a device KV pool: f32 residual
/// stream and temporaries, the fused projections and their bf16 copies, and the logits.
fn activation_reserve(mc: &crate::model::ModelConfig, config: &EngineConfig) -> usize {
    let tokens = config.scheduler.max_num_batched_tokens;
    let per_token = 4 * (8 * mc.hidden_size + 2 * mc.qkv_width() + 4 * mc.intermediate_size)
        + 2 * (mc.qkv_width() + 2 * mc.intermediate_size);
    let logits = config.scheduler.max_num_seqs * mc.vocab_size * 4 * 2;
    tokens * per_token + logits + (256 << 20)
}

pub(crate) fn run<B: Backend>(
    backend: B,
    model: GlmModel<B>,
    tokenizer: Option<Arc<Tokenizer>>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    rx: flume::Receiver<Command>,
    ready: flume::Sender<Result<usize>>,
) {
    let started = (|| -> Result<(Core<B>, rayon::ThreadPool)> {
        if let Some(core) = config.threading.engine_core {
            threading::pin_current_thread(core)?;
        }
        let pool = threading::build_compute_pool(&config.threading)?;
        let mc = model.config().clone();
        let bs = config.cache.block_size;
        let block_bytes = model
            .kv_cache_shape(1, bs)
            .block_bytes(backend.kv_cache_elem_bytes());
        // A device backend sizes the pool from what its memory has left (after the weights and
        // room for one step's activations); the CPU from `cache.memory_bytes`.
        let device_budget = backend
            .kv_cache_budget()?
            .map(|free| free.saturating_sub(activation_reserve(&mc, &config)));
        let num_blocks = match (config.cache.num_blocks, device_budget) {
            (Some(n), _) => n,
            (None, Some(budget)) => budget / block_bytes,
            (None, None) => config.cache.memory_bytes / block_bytes,
        };
        if num_blocks == 0 {
            return Err(match device_budget {
                Some(budget) => Error::config(
                    "cuda.memory_utilization",
                    format!(
                        "{} leaves {} MiB on {} for the KV cache, less than one block ({block_bytes} bytes)",
                        config.cuda.memory_utilization,
                        budget >> 20,
                        backend.name()
                    ),
                ),
                None => Error::config(
                    "cache.memory_bytes",
                    format!(
                        "{} bytes hold no KV block ({block_bytes} bytes each)",
                        config.cache.memory_bytes
                    ),
                ),
            });
        }
        let kv_bytes = num_blocks * block_bytes;
        if let Some(budget) = device_budget {
            if kv_bytes > budget {
                return Err(Error::config(
                    "cache.num_blocks",
                    format!(
                        "{num_blocks} blocks need {} MiB but {} has {} MiB left for the KV cache",
                        kv_bytes >> 20,
                        backend.name(),
                        budget >> 20
                    ),
                ));
            }
        } else if let Some(avail) = mem_available() {
            if kv_bytes > avail {
                return Err(Error::config(
                    "cache",
                    format!(
                        "the KV cache needs {} MiB but only {} MiB of memory is available",
                        kv_bytes >> 20,
                        avail >> 20
                    ),
                ));
            }
        }
        let max_model_len = match config.scheduler.max_model_len {
            Some(len) if len > mc.max_position_embeddings => {
                return Err(Error::config(
                    "scheduler.max_model_len",
                    format!(
                        "{len} exceeds the model's max_position_embeddings {}",
                        mc.max_position_embeddings
                    ),
                ))
            }
            Some(len) => len,
            None => mc.max_position_embeddings,
        }
        .min(num_blocks * bs);
        let cache = backend.alloc_kv_cache(model.kv_cache_shape(num_blocks, bs))?;
        let mut eos = mc.eos_token_ids.clone();
        if let Some(t) = &tokenizer {
            eos.extend_from_slice(t.eos_token_ids());
            // The detokenizer's byte table (a pass over the vocabulary) is built now, not in the
            // first request's first token.
            t.prepare_detokenizer();
        }
        eos.sort_unstable();
        eos.dedup();
        stats.kv_blocks_total.store(num_blocks, Ordering::Relaxed);
        let blocks = BlockManager::new(num_blocks, bs, config.cache.enable_prefix_caching);
        let scheduler = Scheduler::new(
            blocks,
            config.scheduler.max_num_seqs,
            config.scheduler.max_num_batched_tokens,
        );
        let pinned = PinnedPool::new(backend.host_allocator(), PinnedPoolConfig::default())?;
        let encoder = Encoder::new(&backend, model.vision_shared(), &config, stats.clone())?;
        stats.pinned_pool.get_or_init(|| pinned.clone());
        let grammar_eos = super::grammar::trie_eos(tokenizer.as_deref());
        let stats_log = StatsLog::new(config.log_stats_interval, &stats);
        tracing::info!(
            target: "autoglm::engine",
            backend = %backend.name(),
            kv_blocks = num_blocks,
            block_size = bs,
            kv_cache_mib = kv_bytes >> 20,
            max_model_len,
            max_num_seqs = config.scheduler.max_num_seqs,
            max_num_batched_tokens = config.scheduler.max_num_batched_tokens,
            prefix_caching = config.cache.enable_prefix_caching,
            "engine started"
        );
        let core = Core {
            backend,
            model,
            cache,
            tokenizer,
            scheduler,
            requests: HashMap::default(),
            choices: HashMap::default(),
            next_seq: 1,
            arrivals: 0,
            seed_rng: SamplerState::new(config.seed),
            max_model_len,
            grammar_eos,
            eos,
            stats,
            logits_scratch: Vec::new(),
            row_sampling: Vec::new(),
            sampled_ids: Vec::new(),
            pinned,
            encoder_cache: EncoderCache::new(config.multimodal.encoder_cache_bytes),
            encoder,
            pending: HashMap::default(),
            image_pins: HashMap::default(),
            waits_scratch: Vec::new(),
            paused: HashSet::default(),
            stats_log,
        };
        Ok((core, pool))
    })();
    let (mut core, pool) = match started {
        Ok(x) => x,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(core.max_model_len));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.install(|| core.run_loop(&rx))
    }));
    if result.is_err() {
        tracing::error!(target: "autoglm::engine", "the engine thread panicked; failing its requests");
        core.fail_all(|| Error::Backend("the engine thread panicked; see stderr".into()));
    }
}

impl<B: Backend> Core<B> {
    fn run_loop(&mut self, rx: &flume::Receiver<Command>) {
        let mut blocked = false;
        loop {
            if (!self.scheduler.has_work() || blocked) && !self.wait_for_event(rx) {
                return;
            }
            while let Ok(cmd) = rx.try_recv() {
                if !self.handle(cmd) {
                    return;
                }
            }
            for e in self.encoder.try_results() {
                self.on_encoded(e);
            }
            blocked = self.scheduler.has_work()
                && matches!(
                    self.step(),
                    Progress::WaitingForEncoder | Progress::WaitingForStreams
                );
            if let Some(log) = self.stats_log.as_mut() {
                log.tick(&self.stats);
            }
        }
    }

    /// Blocks until a command or an encoded image arrives, and handles it. False on shutdown.
    fn wait_for_event(&mut self, rx: &flume::Receiver<Command>) -> bool {
        enum Event<T> {
            Command(std::result::Result<Command, flume::RecvError>),
            Encoded(std::result::Result<Encoded<T>, flume::RecvError>),
        }
        // While the stats log has something unlogged, wake up at its window's end to log it.
        let deadline = self
            .stats_log
            .as_ref()
            .and_then(|log| log.deadline(&self.stats));
        let event = match (self.encoder.results(), deadline) {
            (Some(results), Some(deadline)) if self.encoder.outstanding() => flume::Selector::new()
                .recv(rx, Event::Command)
                .recv(results, Event::Encoded)
                .wait_deadline(deadline)
                .ok(),
            (Some(results), None) if self.encoder.outstanding() => Some(
                flume::Selector::new()
                    .recv(rx, Event::Command)
                    .recv(results, Event::Encoded)
                    .wait(),
            ),
            (_, Some(deadline)) => match rx.recv_deadline(deadline) {
                Err(flume::RecvTimeoutError::Timeout) => None,
                Ok(cmd) => Some(Event::Command(Ok(cmd))),
                Err(flume::RecvTimeoutError::Disconnected) => {
                    Some(Event::Command(Err(flume::RecvError::Disconnected)))
                }
            },
            (_, None) => Some(Event::Command(rx.recv())),
        };
        if let Some(log) = self.stats_log.as_mut() {
            if deadline.is_none() {
                log.woke_from_idle();
            }
        }
        let Some(event) = event else {
            // The stats window ended: the loop's tick logs it.
            return true;
        };
        match event {
            Event::Command(Ok(cmd)) => self.handle(cmd),
            Event::Command(Err(_)) => false,
            Event::Encoded(Ok(e)) => {
                self.encoder.took_one();
                self.on_encoded(e);
                true
            }
            Event::Encoded(Err(_)) => {
                // The encoder thread is gone; what it had is encoded in the steps that need it.
                tracing::warn!(
                    target: "autoglm::engine",
                    "the image encoder thread stopped; encoding on the engine thread"
                );
                self.encoder = Encoder::Inline {
                    queue: Default::default(),
                    tokens_per_step: usize::MAX,
                };
                self.pending.clear();
                true
            }
        }
    }

    /// Queues the images of a new sequence that the encoder cache lacks, and pins them all.
    fn track_images(&mut self, seq: SeqId, images: &PromptImages) {
        let mut pins = Vec::with_capacity(images.images.len());
        for im in &images.images {
            let hash = im.image.content_hash;
            self.encoder_cache.pin(hash);
            pins.push(PinnedImage {
                hash,
                start: im.offset,
                end: im.offset + im.num_tokens,
            });
            if let Some(p) = self.pending.get(&hash) {
                // Wanted again before the encoder skipped it.
                p.cancelled.store(false, Ordering::Relaxed);
            } else if !self.encoder_cache.contains(hash) {
                let cancelled = Arc::new(AtomicBool::new(false));
                self.pending.insert(
                    hash,
                    PendingImage {
                        tokens: im.num_tokens,
                        cancelled: cancelled.clone(),
                    },
                );
                self.encoder.submit(EncodeJob {
                    hash,
                    image: im.image.clone(),
                    tokens: im.num_tokens,
                    cancelled,
                });
            }
        }
        if !pins.is_empty() {
            self.image_pins.insert(seq, pins);
        }
    }

    /// Unpins the images a sequence has passed (`computed` tokens in), or all of them (`None`:
    /// it is gone). An image nobody needs any more is not encoded if it has not started.
    fn release_images(&mut self, seq: SeqId, computed: Option<usize>) {
        let Some(pins) = self.image_pins.get_mut(&seq) else {
            return;
        };
        let (cache, pending) = (&mut self.encoder_cache, &self.pending);
        pins.retain(|p| {
            if computed.is_some_and(|c| c < p.end) {
                return true;
            }
            if cache.unpin(p.hash) {
                if let Some(p) = pending.get(&p.hash) {
                    p.cancelled.store(true, Ordering::Relaxed);
                }
            }
            false
        });
        if pins.is_empty() {
            self.image_pins.remove(&seq);
        }
    }

    /// Takes in an encoder result.
    fn on_encoded(&mut self, e: Encoded<B::Tensor>) {
        match e {
            Encoded::Done(hash, Ok(embeds)) => {
                if let Some(p) = self.pending.remove(&hash) {
                    let bytes = p.tokens * self.model.config().hidden_size * 4;
                    self.encoder_cache.insert(hash, embeds, bytes);
                }
            }
            Encoded::Done(hash, Err(e)) => {
                self.pending.remove(&hash);
                let requests: Vec<RequestId> = self
                    .image_pins
                    .iter()
                    .filter(|(_, pins)| pins.iter().any(|p| p.hash == hash))
                    .filter_map(|(seq, _)| self.choices.get(seq).map(|c| c.request))
                    .collect();
                let mut e = Some(e);
                for r in requests {
                    let err = e
                        .take()
                        .unwrap_or_else(|| Error::Backend("image encoding failed".into()));
                    self.abort_request(r, Some(err));
                }
            }
            Encoded::Skipped(hash) => {
                self.pending.remove(&hash);
                if !self.encoder_cache.is_pinned(hash) {
                    return;
                }
                // Wanted again after the encoder skipped it: queue it anew.
                let image = self.image_pins.keys().find_map(|seq| {
                    let seq = self.scheduler.get(*seq)?;
                    seq.images
                        .as_ref()?
                        .images
                        .iter()
                        .find(|im| im.image.content_hash == hash)
                        .cloned()
                });
                if let Some(im) = image {
                    let cancelled = Arc::new(AtomicBool::new(false));
                    self.pending.insert(
                        hash,
                        PendingImage {
                            tokens: im.num_tokens,
                            cancelled: cancelled.clone(),
                        },
                    );
                    self.encoder.submit(EncodeJob {
                        hash,
                        image: im.image,
                        tokens: im.num_tokens,
                        cancelled,
                    });
                }
            }
        }
    }

    /// Tells the scheduler which image ranges each sequence in prefill waits for.
    fn refresh_encoder_waits(&mut self) {
        let mut waits = std::mem::take(&mut self.waits_scratch);
        for (seq, pins) in &self.image_pins {
            waits.clear();
            waits.extend(
                pins.iter()
                    .filter(|p| self.pending.contains_key(&p.hash))
                    .map(|p| (p.start, p.end)),
            );
            self.scheduler.set_encoder_waits(*seq, &waits);
        }
        self.waits_scratch = waits;
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(new) => self.add_request(*new),
            Command::Cancel(id) => self.abort_request(id, None),
            Command::Resume(id) => self.set_paused(id, false),
            Command::Shutdown => {
                self.fail_all(|| Error::EngineShutdown);
                return false;
            }
        }
        true
    }

    fn add_request(&mut self, new: NewRequest) {
        let NewRequest {
            id,
            req,
            tx,
            images,
            grammars,
        } = new;
        let mut grammars = grammars.into_iter();
        let stops = match sampling::StopStrings::new(&req.params.stop) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let n = req.params.n;
        let max_output = req
            .params
            .max_tokens
            .min(self.max_model_len - req.prompt.len());
        let base_seed = req
            .params
            .seed
            .unwrap_or_else(|| rand_seed(&mut self.seed_rng));
        let mut seqs = Vec::with_capacity(n);
        for index in 0..n {
            let seq_id = self.next_seq;
            self.next_seq += 1;
            self.arrivals += 1;
            let mut seq = Sequence::new(seq_id, req.prompt.clone(), req.priority, self.arrivals);
            seq.images = images.clone();
            seq.cache_salt = req
                .cache_salt
                .as_deref()
                .map_or(0, super::sequence::cache_salt_hash);
            self.scheduler.add(seq);
            if let Some(im) = &images {
                self.track_images(seq_id, im);
            }
            let detok = self
                .tokenizer
                .as_ref()
                .map(|_| IncrementalDetokenizer::new(req.params.skip_special_tokens));
            self.choices.insert(
                seq_id,
                ChoiceState {
                    request: id,
                    index,
                    sampler: SamplerState::new(base_seed.wrapping_add(index as u64)),
                    detok,
                    grammar: grammars.next().map(GrammarSlot::new),
                    text: String::new(),
                    emitted: 0,
                    first_schedule: true,
                },
            );
            seqs.push(seq_id);
        }
        let usage = Usage {
            prompt_tokens: req.prompt.len(),
            ..Default::default()
        };
        tracing::debug!(
            target: "autoglm::engine",
            request = id,
            prompt_tokens = req.prompt.len(),
            max_tokens = max_output,
            n,
            images = images.as_ref().map_or(0, |im| im.images.len()),
            priority = req.priority,
            "request added"
        );
        self.requests.insert(
            id,
            RequestState {
                tx,
                req,
                seqs,
                choices_left: n,
                usage,
                max_output,
                stops,
            },
        );
    }

    /// Removes a request; sends `err` (if any) to its stream.
    fn abort_request(&mut self, id: RequestId, err: Option<Error>) {
        let Some(state) = self.requests.remove(&id) else {
            return;
        };
        self.paused.remove(&id);
        for seq in &state.seqs {
            self.scheduler.remove(*seq);
            self.choices.remove(seq);
            self.release_images(*seq, None);
        }
        match &err {
            Some(e) => tracing::debug!(
                target: "autoglm::engine",
                request = id,
                completion_tokens = state.usage.completion_tokens,
                error = %e,
                "request aborted"
            ),
            None => tracing::debug!(
                target: "autoglm::engine",
                request = id,
                completion_tokens = state.usage.completion_tokens,
                "request cancelled"
            ),
        }
        if let Some(e) = err {
            let _ = state.tx.send(Err(e));
        }
        self.publish_stats();
    }

    /// Holds a request's sequences back (its stream is full) or lets them run again.
    fn set_paused(&mut self, id: RequestId, paused: bool) {
        let Some(state) = self.requests.get(&id) else {
            return;
        };
        let changed = if paused {
            self.paused.insert(id)
        } else {
            self.paused.remove(&id)
        };
        if changed {
            for seq in &state.seqs {
                self.scheduler.set_paused(*seq, paused);
            }
            self.publish_stats();
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> Error) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.abort_request(id, Some(err()));
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.waiting
            .store(self.scheduler.num_waiting(), Ordering::Relaxed);
        s.running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.scheduler.block_manager().num_used(), Ordering::Relaxed);
        let paused = self
            .paused
            .iter()
            .filter_map(|id| self.requests.get(id))
            .map(|r| r.choices_left)
            .sum();
        s.paused.store(paused, Ordering::Relaxed);
    }

    /// The step's batch, in pinned buffers sized for it (on the heap if the pool refuses).
    fn build_batch(&self, plan: &SchedulerOutput) -> ForwardBatch {
        let bs = self.scheduler.block_manager().block_size();
        let stride = plan
            .scheduled
            .iter()
            .map(|s| {
                self.scheduler
                    .get(s.seq_id)
                    .map_or(0, |q| q.block_table.len())
            })
            .max()
            .unwrap_or(1);
        let shape = BatchShape {
            num_tokens: plan.scheduled.iter().map(|s| s.len).sum(),
            num_seqs: plan.scheduled.len(),
            max_blocks_per_seq: stride,
            num_logits: plan.scheduled.iter().filter(|s| s.sample).count(),
            mrope: self.model.config().mrope_section.is_some(),
        };
        let mut batch = ForwardBatch::in_pool(&self.pinned, shape)
            .unwrap_or_else(|_| ForwardBatch::new(stride));
        for s in &plan.scheduled {
            let seq = self
                .scheduler
                .get(s.seq_id)
                .expect("scheduled sequence exists");
            batch.push_seq(
                &seq.tokens[s.start..s.start + s.len],
                s.start,
                &seq.block_table,
                bs,
            );
            if shape.mrope {
                for pos in s.start..s.start + s.len {
                    let thw = match &seq.images {
                        Some(im) => im.mrope.at(pos),
                        None => [pos as u32; 3],
                    };
                    batch.mrope_positions.extend_from_slice(&thw);
                }
            }
            if s.sample {
                batch.logits_indices.push(batch.num_tokens() as u32 - 1);
            }
        }
        batch
    }

    fn step(&mut self) -> Progress {
        // The clock is read only for a listener of the per-step event.
        let started =
            crate::logs::log_enabled!("autoglm::engine", DEBUG).then(std::time::Instant::now);
        for e in self
            .encoder
            .encode_inline(self.model.vision(), &self.backend, &self.stats)
        {
            self.on_encoded(e);
        }
        self.refresh_encoder_waits();
        let plan = self.scheduler.schedule();
        self.stats
            .preemptions
            .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        if !plan.preempted.is_empty() {
            tracing::debug!(
                target: "autoglm::engine",
                preempted = plan.preempted.len(),
                running = self.scheduler.num_running(),
                waiting = self.scheduler.num_waiting(),
                "preempted sequences: the KV cache is full"
            );
        }
        if plan.scheduled.is_empty() {
            // A step that only preempted frees blocks for the next one, and one whose sequences
            // all wait for images has the encoder to wait for. One that did nothing at all
            // otherwise means a lone sequence outgrew the pool, which max_model_len prevents;
            // fail the requests rather than spin.
            if !plan.preempted.is_empty() || self.encoder.queued_inline() {
                return Progress::Ran;
            }
            if self.encoder.outstanding() {
                return Progress::WaitingForEncoder;
            }
            if !self.paused.is_empty() {
                // Everything runnable is held back by its own stream (or waits behind the blocks
                // those hold): wait for a stream to take its events, a cancel or a new request.
                return Progress::WaitingForStreams;
            }
            self.fail_all(|| {
                Error::Backend("the KV cache cannot hold any waiting sequence".into())
            });
            return Progress::Ran;
        }
        for s in &plan.scheduled {
            if let Some(c) = self.choices.get_mut(&s.seq_id) {
                if c.first_schedule {
                    c.first_schedule = false;
                    let prompt_len = self.scheduler.get(s.seq_id).map_or(0, |q| q.prompt_len);
                    self.stats
                        .prefix_cache_queried_tokens
                        .fetch_add(prompt_len as u64, Ordering::Relaxed);
                    self.stats
                        .prefix_cache_hit_tokens
                        .fetch_add(s.start as u64, Ordering::Relaxed);
                    if s.start > 0 {
                        tracing::debug!(
                            target: "autoglm::engine",
                            request = c.request,
                            choice = c.index,
                            cached_tokens = s.start,
                            prompt_tokens = prompt_len,
                            "prefix cache hit"
                        );
                    }
                    if c.index == 0 {
                        if let Some(r) = self.requests.get_mut(&c.request) {
                            r.usage.cached_prompt_tokens = s.start;
                        }
                    }
                }
            }
        }
        let spans = match self.encode_images(&plan) {
            Ok(spans) => spans,
            Err((seq, e)) => {
                if let Some(r) = self.choices.get(&seq).map(|c| c.request) {
                    self.abort_request(r, Some(e));
                }
                return Progress::Ran;
            }
        };
        let batch = self.build_batch(&plan);
        let on_device = self.backend.samples_on_device() && self.device_sampling_rows(&plan);
        let (model, backend, encoder) = (&self.model, &self.backend, &self.encoder_cache);
        let image_rows: Vec<ImageRows<'_, B::Tensor>> = spans
            .iter()
            .filter_map(|sp| {
                encoder.get(sp.hash).map(|embeds| ImageRows {
                    embeds,
                    src_row: sp.src_row,
                    dst_row: sp.dst_row,
                    len: sp.len,
                })
            })
            .collect();
        let mut forward = |b: &ForwardBatch, cache: &mut B::KvCache| {
            model.forward_logits_with_images(backend, b, cache, &image_rows)
        };
        // A step that writes image features runs eagerly: a backend's recorded replay (CUDA
        // graphs of decode-shaped steps) would skip the feature copy.
        let logits = if image_rows.is_empty() {
            backend.run_step(&batch, &mut self.cache, &mut forward)
        } else {
            forward(&batch, &mut self.cache)
        }
        .and_then(|l| {
            if !on_device {
                return self.backend.to_host(&l).map(Sampled::Logits);
            }
            let mut ids = std::mem::take(&mut self.sampled_ids);
            self.backend.sample_rows(&l, &self.row_sampling, &mut ids)?;
            if ids.len() != self.row_sampling.len() {
                return Err(Error::Backend(format!(
                    "sample_rows returned {} tokens for {} rows",
                    ids.len(),
                    self.row_sampling.len()
                )));
            }
            Ok(Sampled::Tokens(ids))
        });
        drop(image_rows);
        self.encoder_cache.evict_to_limit();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let msg = e.to_string();
                let reqs: Vec<RequestId> = plan
                    .scheduled
                    .iter()
                    .filter_map(|s| self.choices.get(&s.seq_id).map(|c| c.request))
                    .collect();
                for r in reqs {
                    self.abort_request(r, Some(Error::Backend(msg.clone())));
                }
                return Progress::Ran;
            }
        };
        self.scheduler.commit(&plan);
        for s in &plan.scheduled {
            self.release_images(s.seq_id, Some(s.start + s.len));
        }
        let prompt_computed: usize = plan
            .scheduled
            .iter()
            .filter_map(|s| {
                self.scheduler
                    .get(s.seq_id)
                    .map(|q| s.len.min(q.prompt_len.saturating_sub(s.start)))
            })
            .sum();
        self.stats
            .prompt_tokens_computed
            .fetch_add(prompt_computed as u64, Ordering::Relaxed);
        let vocab = self.model.config().vocab_size;
        for (row, s) in plan.scheduled.iter().filter(|s| s.sample).enumerate() {
            match &logits {
                Sampled::Logits(l) => {
                    self.sample_and_emit(s.seq_id, &l[row * vocab..(row + 1) * vocab])
                }
                Sampled::Tokens(ids) => self.emit(s.seq_id, ids[row], None),
            }
        }
        if let Sampled::Tokens(ids) = logits {
            self.sampled_ids = ids;
        }
        self.publish_stats();
        if let Some(started) = started {
            let tokens: usize = plan.scheduled.iter().map(|s| s.len).sum();
            tracing::debug!(
                target: "autoglm::engine",
                seqs = plan.scheduled.len(),
                prefill_tokens = prompt_computed,
                decode_tokens = tokens - prompt_computed,
                preempted = plan.preempted.len(),
                running = self.scheduler.num_running(),
                waiting = self.scheduler.num_waiting(),
                step_ms = started.elapsed().as_secs_f64() * 1e3,
                "step"
            );
        }
        Progress::Ran
    }

    /// Returns where each chunk of `plan` takes image features. An image the encoder cache lacks
    /// here (one whose sequence passed it and was then preempted, its features since evicted)
    /// is encoded now, on this thread. On failure, the sequence whose image failed and the
    /// error.
    fn encode_images(
        &mut self,
        plan: &SchedulerOutput,
    ) -> std::result::Result<Vec<ImageSpan>, (SeqId, Error)> {
        let mut spans = Vec::new();
        let mut row0 = 0;
        for s in &plan.scheduled {
            let (start, end) = (s.start, s.start + s.len);
            let images = self.scheduler.get(s.seq_id).and_then(|q| q.images.clone());
            for im in images.iter().flat_map(|im| im.images.iter()) {
                let (lo, hi) = (im.offset.max(start), (im.offset + im.num_tokens).min(end));
                if lo >= hi {
                    continue;
                }
                let hash = im.image.content_hash;
                if self.encoder_cache.touch(hash) {
                    self.stats
                        .encoder_cache_hits
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    let t0 = std::time::Instant::now();
                    let vision = self.model.vision().ok_or_else(|| {
                        (
                            s.seq_id,
                            Error::InvalidRequest("this model does not take images".into()),
                        )
                    })?;
                    let embeds = encoder::encode_image(vision, &self.backend, &im.image)
                        .map_err(|e| (s.seq_id, e))?;
                    let bytes = im.num_tokens * self.model.config().hidden_size * 4;
                    self.encoder_cache.insert(hash, embeds, bytes);
                    self.stats.images_encoded.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .image_encode_ns
                        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                spans.push(ImageSpan {
                    hash,
                    src_row: lo - im.offset,
                    dst_row: row0 + (lo - start),
                    len: hi - lo,
                });
            }
            row0 += s.len;
        }
        Ok(spans)
    }

    /// For a backend that samples on the device: fills `row_sampling` for the plan's sampled
    /// rows, drawing each sampling (non-greedy) row's uniform from its sequence's RNG, when no row
    /// needs the full logits on the host (logprobs, penalties). False (nothing drawn) otherwise.
    fn device_sampling_rows(&mut self, plan: &SchedulerOutput) -> bool {
        self.row_sampling.clear();
        for s in plan.scheduled.iter().filter(|s| s.sample) {
            let Some(p) = self
                .choices
                .get(&s.seq_id)
                .and_then(|c| self.requests.get(&c.request))
                .map(|r| &r.req.params)
            else {
                return false;
            };
            if p.logprobs.is_some() || sampling::has_penalties(p) || p.structured.is_some() {
                return false;
            }
            self.row_sampling.push(if p.is_greedy() {
                RowSampling::GREEDY
            } else {
                RowSampling {
                    temperature: p.temperature,
                    top_k: p.top_k,
                    top_p: p.top_p,
                    min_p: p.min_p,
                    uniform: 0.0,
                }
            });
        }
        // The draws, once every row is known to be sampled on the device (so a step sampled on
        // the host consumes exactly the draws the host sampler makes).
        for (row, s) in self
            .row_sampling
            .iter_mut()
            .zip(plan.scheduled.iter().filter(|s| s.sample))
        {
            if row.temperature > 0.0 {
                if let Some(c) = self.choices.get_mut(&s.seq_id) {
                    row.uniform = c.sampler.uniform();
                }
            }
        }
        true
    }

    fn sample_and_emit(&mut self, seq_id: SeqId, logits: &[f32]) {
        let Some(choice) = self.choices.get_mut(&seq_id) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&choice.request) else {
            return;
        };
        let seq = self.scheduler.get(seq_id).expect("sampled sequence exists");
        let params = &req.req.params;
        if let Some(g) = choice.grammar.as_mut() {
            // Structured output: the grammar's mask, then the usual sampler on what it allows.
            let waited = std::time::Instant::now();
            let mask = g.mask();
            self.stats
                .grammar_wait_ns
                .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.grammar_masks.fetch_add(1, Ordering::Relaxed);
            let masked = mask.and_then(|mask| {
                let eos = self.eos.as_slice();
                match apply_mask(
                    mask,
                    eos,
                    self.grammar_eos,
                    logits,
                    &mut self.logits_scratch,
                ) {
                    0 => Err("the grammar allows no token here".to_string()),
                    _ => Ok(()),
                }
            });
            if let Err(e) = masked {
                let id = choice.request;
                self.abort_request(
                    id,
                    Some(Error::InvalidRequest(format!("structured output: {e}"))),
                );
                return;
            }
            let token = sampling::sample(
                &mut self.logits_scratch,
                params,
                &seq.tokens[..seq.prompt_len],
                seq.output(),
                &mut choice.sampler,
            );
            let logprobs = params
                .logprobs
                .map(|n| sampling::logprobs_of(logits, token, n));
            self.emit(seq_id, token, logprobs);
            return;
        }
        // Without penalties the logits are only read: no copy.
        let token = if sampling::has_penalties(params) {
            self.logits_scratch.clear();
            self.logits_scratch.extend_from_slice(logits);
            sampling::sample(
                &mut self.logits_scratch,
                params,
                &seq.tokens[..seq.prompt_len],
                seq.output(),
                &mut choice.sampler,
            )
        } else {
            sampling::sample_unpenalised(logits, params, &mut choice.sampler)
        };
        let logprobs = params
            .logprobs
            .map(|n| sampling::logprobs_of(logits, token, n));
        self.emit(seq_id, token, logprobs);
    }

    /// Appends the sampled `token` to its sequence and sends it (with its logprobs) to the client.
    fn emit(&mut self, seq_id: SeqId, token: u32, logprobs: Option<sampling::TokenLogprobs>) {
        let Some(choice) = self.choices.get_mut(&seq_id) else {
            return;
        };
        let Some(req) = self.requests.get_mut(&choice.request) else {
            return;
        };
        let seq = self.scheduler.get(seq_id).expect("sampled sequence exists");
        let params = &req.req.params;
        let n_out = seq.output().len() + 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        req.usage.completion_tokens += 1;

        let mut finish = None;
        // A grammar lets end-of-sequence through only where its text is complete: it ends the
        // choice even with `ignore_eos`.
        let is_stop_token = ((!params.ignore_eos || choice.grammar.is_some())
            && self.eos.contains(&token))
            || params.stop_token_ids.contains(&token);
        if is_stop_token {
            finish = Some(FinishReason::Stop);
        } else if let (Some(detok), Some(tok)) = (choice.detok.as_mut(), self.tokenizer.as_deref())
        {
            match detok.push(tok, token) {
                Ok(delta) => choice.text.push_str(&delta),
                Err(e) => {
                    let id = choice.request;
                    self.abort_request(id, Some(e));
                    return;
                }
            }
        }
        let mut end = choice.text.len();
        if finish.is_none() {
            if let Some(pos) = req.stops.find(&choice.text, choice.emitted) {
                choice.text.truncate(pos);
                end = pos;
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && n_out >= req.max_output {
            finish = Some(FinishReason::Length);
        }
        if finish == Some(FinishReason::Length) {
            if let (Some(detok), Some(tok)) = (choice.detok.as_mut(), self.tokenizer.as_deref()) {
                choice.text.push_str(&detok.flush(tok).unwrap_or_default());
                end = choice.text.len();
            }
        }
        if finish.is_none() {
            // Hold back what could still become a stop string.
            let hold = req.stops.hold();
            end = floor_char_boundary(&choice.text, choice.text.len().saturating_sub(hold))
                .max(choice.emitted);
        }
        let text = choice.text[choice.emitted..end].to_string();
        choice.emitted = end;
        let mut out = RequestOutput {
            index: choice.index,
            token_ids: vec![token],
            text,
            logprobs: logprobs.into_iter().collect(),
            finish_reason: finish,
            usage: None,
        };
        let request = choice.request;
        // The request's state once its last choice has finished (its sender ends the stream when
        // dropped, after this last event).
        let mut finished = None;
        if finish.is_some() {
            req.choices_left -= 1;
            if req.choices_left == 0 {
                out.usage = Some(req.usage);
                tracing::debug!(
                    target: "autoglm::engine",
                    request,
                    finish_reason = finish.map_or("", FinishReason::as_str),
                    prompt_tokens = req.usage.prompt_tokens,
                    completion_tokens = req.usage.completion_tokens,
                    cached_prompt_tokens = req.usage.cached_prompt_tokens,
                    "request finished"
                );
                finished = self.requests.remove(&request);
            }
            // Free the blocks before the client can see the end of its stream.
            self.scheduler.remove(seq_id);
            self.choices.remove(&seq_id);
            self.release_images(seq_id, None);
            self.publish_stats();
        } else {
            self.scheduler.append_token(seq_id, token);
            if let Some(g) = choice.grammar.as_mut() {
                // The next mask, computed while the next step runs.
                g.advance(Some(token));
            }
        }
        let state = finished.as_ref().or_else(|| self.requests.get(&request));
        match state.map(|st| st.tx.send(Ok(out))) {
            Some(Err(_)) => self.abort_request(request, None),
            // The stream's consumer is behind: hold the request back, never the engine.
            Some(Ok(Sent::Full)) if finished.is_none() => self.set_paused(request, true),
            _ => {}
        }
    }
}

/// A step's sampling input: host logits, or the tokens the backend sampled.
enum Sampled {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

fn rand_seed(state: &mut SamplerState) -> u64 {
    state.next_u64()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
