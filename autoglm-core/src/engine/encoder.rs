//! Where prompts' images go through the vision tower: beside the engine's steps, or between them.
//!
//! The engine queues each image a new prompt needs that the encoder cache lacks. On a backend
//! with a [`Backend::concurrent_handle`] (the CPU) a thread of its own encodes them, one at a
//! time in arrival order, on a rayon pool of its own whose threads run at a lower priority, while
//! the engine thread keeps stepping: decoding streams are never held for an encode, and the
//! image's sequence waits at its first placeholder until the features are back. Elsewhere the
//! engine thread encodes them itself before a step, at most `max_encoder_tokens_per_step` image
//! tokens' worth per step (at least one image), so one step never encodes a burst of images.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::EngineStats;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::media::ProcessedImage;
use crate::model::vision::VisionModel;

/// One image to encode.
pub(crate) struct EncodeJob {
    pub(crate) hash: u64,
    pub(crate) image: Arc<ProcessedImage>,
    /// Its image tokens (feature rows).
    pub(crate) tokens: usize,
    /// Set when no sequence needs the image any more: a job not yet started is skipped.
    pub(crate) cancelled: Arc<AtomicBool>,
}

/// What came of a job.
pub(crate) enum Encoded<T> {
    Done(u64, Result<T>),
    Skipped(u64),
}

/// Runs the tower on one image.
pub(crate) fn encode_image<B: Backend>(
    vision: &VisionModel<B>,
    backend: &B,
    image: &ProcessedImage,
) -> Result<B::Tensor> {
    let [_, gh, gw] = image.grid_thw;
    let batch = vision.batch(&[[gh, gw]])?;
    vision.encode(backend, &image.pixel_values, &batch)
}

/// Encodes on the engine thread's stats counters' behalf: the count and the time.
fn timed<T>(stats: &EngineStats, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    let r = f();
    if r.is_ok() {
        stats.images_encoded.fetch_add(1, Ordering::Relaxed);
        stats
            .image_encode_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    r
}

pub(crate) enum Encoder<B: Backend> {
    /// A thread of its own; results come back on `results`.
    Concurrent {
        jobs: flume::Sender<EncodeJob>,
        results: flume::Receiver<Encoded<B::Tensor>>,
        /// Jobs sent and not yet answered.
        outstanding: usize,
    },
    /// The engine thread encodes `queue` before its steps.
    Inline {
        queue: VecDeque<EncodeJob>,
        tokens_per_step: usize,
    },
}

impl<B: Backend> Encoder<B> {
    /// An encoder thread when the backend allows one and `concurrent`, else the inline queue.
    pub(crate) fn new(
        backend: &B,
        vision: Option<Arc<VisionModel<B>>>,
        config: &crate::config::EngineConfig,
        stats: Arc<EngineStats>,
    ) -> Result<Self> {
        let m = &config.multimodal;
        let inline = Encoder::Inline {
            queue: VecDeque::new(),
            tokens_per_step: m
                .max_encoder_tokens_per_step
                .unwrap_or(config.scheduler.max_num_batched_tokens),
        };
        let (Some(vision), true) = (vision, m.concurrent_encoder) else {
            return Ok(inline);
        };
        let Some(handle) = backend.concurrent_handle() else {
            return Ok(inline);
        };
        let threads = match m.encoder_threads {
            0 => config
                .threading
                .num_threads
                .unwrap_or_else(|| crate::threading::allowed_cores().len()),
            n => n,
        };
        let pool = crate::threading::build_pool_niced(
            "autoglm-encoder",
            &m.encoder_cores,
            threads,
            m.media_nice,
        )?;
        let (jobs, job_rx) = flume::unbounded::<EncodeJob>();
        let (result_tx, results) = flume::unbounded();
        // Not joined: an engine that shuts down mid-encode (seconds for a large image on the CPU)
        // does not wait for it; the thread ends after the job in hand, once `jobs` is dropped.
        std::thread::Builder::new()
            .name("autoglm-encoder".into())
            .spawn(move || {
                for job in job_rx.iter() {
                    if job.cancelled.load(Ordering::Relaxed) {
                        if result_tx.send(Encoded::Skipped(job.hash)).is_err() {
                            return;
                        }
                        continue;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        pool.install(|| {
                            timed(&stats, || encode_image(&vision, &handle, &job.image))
                        })
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Backend(
                            "the vision tower panicked on the encoder thread; see stderr".into(),
                        ))
                    });
                    if result_tx.send(Encoded::Done(job.hash, r)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Backend(format!("cannot start the encoder thread: {e}")))?;
        Ok(Encoder::Concurrent {
            jobs,
            results,
            outstanding: 0,
        })
    }

    /// Queues a job.
    pub(crate) fn submit(&mut self, job: EncodeJob) {
        match self {
            Encoder::Concurrent {
                jobs, outstanding, ..
            } => {
                if jobs.send(job).is_ok() {
                    *outstanding += 1;
                }
            }
            Encoder::Inline { queue, .. } => queue.push_back(job),
        }
    }

    /// Whether images are out on the encoder thread (the engine may wait for them).
    pub(crate) fn outstanding(&self) -> bool {
        matches!(self, Encoder::Concurrent { outstanding, .. } if *outstanding > 0)
    }

    /// Whether jobs wait for the engine thread to encode them.
    pub(crate) fn queued_inline(&self) -> bool {
        matches!(self, Encoder::Inline { queue, .. } if !queue.is_empty())
    }

    /// The receiver of the encoder thread's results, to wait on beside the commands.
    pub(crate) fn results(&self) -> Option<&flume::Receiver<Encoded<B::Tensor>>> {
        match self {
            Encoder::Concurrent { results, .. } => Some(results),
            Encoder::Inline { .. } => None,
        }
    }

    /// Results that are ready, without waiting.
    pub(crate) fn try_results(&mut self) -> Vec<Encoded<B::Tensor>> {
        let Encoder::Concurrent {
            results,
            outstanding,
            ..
        } = self
        else {
            return Vec::new();
        };
        let got: Vec<_> = results.try_iter().collect();
        *outstanding -= got.len().min(*outstanding);
        got
    }

    /// Notes a result taken from [`Encoder::results`] directly.
    pub(crate) fn took_one(&mut self) {
        if let Encoder::Concurrent { outstanding, .. } = self {
            *outstanding = outstanding.saturating_sub(1);
        }
    }

    /// Inline: encodes queued jobs on this thread, the first always and then while their image
    /// tokens fit the per-step budget. Concurrent: nothing.
    pub(crate) fn encode_inline(
        &mut self,
        vision: Option<&VisionModel<B>>,
        backend: &B,
        stats: &EngineStats,
    ) -> Vec<Encoded<B::Tensor>> {
        let Encoder::Inline {
            queue,
            tokens_per_step,
        } = self
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut spent = 0;
        while let Some(job) = queue.front() {
            if job.cancelled.load(Ordering::Relaxed) {
                out.push(Encoded::Skipped(job.hash));
                queue.pop_front();
                continue;
            }
            let tokens = job.tokens;
            if spent > 0 && spent + tokens > *tokens_per_step {
                break;
            }
            spent += tokens;
            let job = queue.pop_front().expect("front exists");
            let r = match vision {
                Some(v) => timed(stats, || encode_image(v, backend, &job.image)),
                None => Err(Error::InvalidRequest(
                    "this model does not take images".into(),
                )),
            };
            out.push(Encoded::Done(job.hash, r));
        }
        out
    }
}
