//! Property tests of the scheduler and block manager: after any sequence of submit / step /
//! cancel, no block is leaked or shared wrongly, and every sequence eventually finishes.

use autoglm_core::engine::block_manager::BlockManager;
use autoglm_core::engine::scheduler::Scheduler;
use autoglm_core::engine::sequence::Sequence;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence: prompt made of `len` tokens drawn from a small alphabet (so prefixes repeat),
    /// wanting `gen` tokens, at `priority`.
    Submit {
        len: usize,
        alphabet: u32,
        gen: usize,
        priority: i32,
    },
    /// Run one engine step.
    Step,
    /// Cancel the k-th live sequence.
    Cancel(usize),
    /// The k-th live sequence waits for an image's features at tokens `[start, start + len)`.
    Wait(usize, usize, usize),
    /// The k-th live sequence's images are all encoded.
    Ready(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..40, 1u32..4, 1usize..12, -2i32..3).prop_map(|(len, alphabet, gen, priority)| {
            Op::Submit {
                len,
                alphabet,
                gen,
                priority,
            }
        }),
        Just(Op::Step),
        Just(Op::Step),
        Just(Op::Step),
        (0usize..8).prop_map(Op::Cancel),
        (0usize..8, 0usize..40, 1usize..12).prop_map(|(k, start, len)| Op::Wait(k, start, len)),
        (0usize..8).prop_map(Op::Ready),
    ]
}

struct Sim {
    sched: Scheduler,
    /// (id, tokens still to generate)
    live: Vec<(u64, usize)>,
    next: u64,
    max_tokens_per_step: usize,
}

impl Sim {
    fn step(&mut self) {
        let plan = self.sched.schedule();
        assert!(
            plan.num_tokens() <= self.max_tokens_per_step,
            "budget exceeded"
        );
        for s in &plan.scheduled {
            let seq = self.sched.get(s.seq_id).unwrap();
            // A sequence never computes into an image range it waits for.
            let waits = &seq.encoder_waits;
            let blocked = waits
                .iter()
                .any(|&(lo, hi)| s.start < hi && s.start + s.len > lo);
            assert!(!blocked, "{:?} runs into a waited-for range {waits:?}", s);
        }
        let mut seen = std::collections::HashSet::new();
        for s in &plan.scheduled {
            assert!(
                seen.insert(s.seq_id),
                "sequence scheduled twice in one step"
            );
            let seq = self.sched.get(s.seq_id).unwrap();
            assert_eq!(s.start, seq.num_computed);
            assert!(
                seq.block_table.len() * self.sched.block_manager().block_size() >= s.start + s.len
            );
        }
        self.sched.commit(&plan);
        for s in plan.scheduled.iter().filter(|s| s.sample) {
            let i = self.live.iter().position(|l| l.0 == s.seq_id).unwrap();
            self.live[i].1 -= 1;
            if self.live[i].1 == 0 {
                self.sched.remove(s.seq_id);
                self.live.remove(i);
            } else {
                self.sched.append_token(s.seq_id, (s.seq_id % 7) as u32);
            }
        }
        self.sched.check_invariants();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn blocks_are_never_leaked_or_shared_wrongly(
        ops in prop::collection::vec(op(), 1..120),
        num_blocks in 14usize..40,
        block_size in 1usize..6,
        budget in 1usize..64,
        max_seqs in 1usize..6,
        caching in any::<bool>(),
    ) {
        // Every sequence must fit the pool alone: prompt < 40, output < 12.
        prop_assume!(num_blocks * block_size >= 52);
        let mut sim = Sim {
            sched: Scheduler::new(BlockManager::new(num_blocks, block_size, caching), max_seqs, budget),
            live: Vec::new(),
            next: 1,
            max_tokens_per_step: budget,
        };
        for op in ops {
            match op {
                Op::Submit { len, alphabet, gen, priority } => {
                    let tokens = (0..len as u32).map(|i| (i * 7 + len as u32) % alphabet).collect();
                    sim.sched.add(Sequence::new(sim.next, tokens, priority, sim.next));
                    sim.live.push((sim.next, gen));
                    sim.next += 1;
                }
                Op::Step => sim.step(),
                Op::Wait(k, start, len) => {
                    if !sim.live.is_empty() {
                        let id = sim.live[k % sim.live.len()].0;
                        sim.sched.set_encoder_waits(id, &[(start, start + len)]);
                    }
                }
                Op::Ready(k) => {
                    if !sim.live.is_empty() {
                        let id = sim.live[k % sim.live.len()].0;
                        sim.sched.set_encoder_waits(id, &[]);
                    }
                }
                Op::Cancel(k) => {
                    if !sim.live.is_empty() {
                        let (id, _) = sim.live.remove(k % sim.live.len());
                        sim.sched.remove(id);
                    }
                }
            }
            sim.sched.check_invariants();
        }
        // Drain: once every image is encoded, everything finishes and the pool is whole again.
        for &(id, _) in &sim.live {
            sim.sched.set_encoder_waits(id, &[]);
        }
        for _ in 0..10_000 {
            if sim.live.is_empty() { break; }
            sim.step();
        }
        prop_assert!(sim.live.is_empty(), "sequences starved: {:?}", sim.live);
        prop_assert_eq!(sim.sched.block_manager().num_used(), 0);
        prop_assert_eq!(sim.sched.block_manager().num_free(), num_blocks);
    }
}

#[test]
fn preemption_frees_the_lowest_priority_latest_sequence() {
    let mut s = Scheduler::new(BlockManager::new(4, 2, false), 8, 100);
    s.add(Sequence::new(1, vec![1, 2, 3], 0, 1)); // 2 blocks
    s.add(Sequence::new(2, vec![4, 5, 6], 1, 2)); // 2 blocks, lower priority
    let plan = s.schedule();
    assert_eq!(plan.scheduled.len(), 2);
    s.commit(&plan);
    s.append_token(1, 9);
    s.append_token(2, 9);
    // Both now need a third block; only sequence 2 (priority 1) may be preempted.
    s.append_token(1, 9);
    let plan = s.schedule();
    assert_eq!(plan.preempted, vec![2]);
    assert_eq!(
        plan.scheduled.iter().map(|p| p.seq_id).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(s.get(2).unwrap().num_computed, 0);
    s.check_invariants();
}

#[test]
fn waiting_sequences_are_admitted_by_priority_then_arrival() {
    let mut s = Scheduler::new(BlockManager::new(64, 4, false), 2, 100);
    s.add(Sequence::new(1, vec![1; 5], 3, 1));
    s.add(Sequence::new(2, vec![1; 5], -1, 2));
    s.add(Sequence::new(3, vec![1; 5], -1, 3));
    let plan = s.schedule();
    assert_eq!(
        plan.scheduled.iter().map(|p| p.seq_id).collect::<Vec<_>>(),
        vec![2, 3]
    );
}

#[test]
fn prompts_are_chunked_to_the_token_budget() {
    let mut s = Scheduler::new(BlockManager::new(64, 4, false), 4, 6);
    s.add(Sequence::new(1, (0..14).collect(), 0, 1));
    let mut chunks = Vec::new();
    loop {
        let plan = s.schedule();
        let p = plan.scheduled[0];
        chunks.push((p.start, p.len, p.sample));
        s.commit(&plan);
        if p.sample {
            break;
        }
    }
    assert_eq!(chunks, vec![(0, 6, false), (6, 6, false), (12, 2, true)]);
}

#[test]
fn cached_prefix_blocks_are_shared_and_refcounted() {
    let mut s = Scheduler::new(BlockManager::new(16, 4, true), 4, 100);
    s.add(Sequence::new(1, (0..10).collect(), 0, 1));
    let plan = s.schedule();
    s.commit(&plan);
    // Same 8-token prefix: the two full blocks are taken from sequence 1.
    s.add(Sequence::new(2, (0..9).collect(), 0, 2));
    let plan = s.schedule();
    let p2 = plan.scheduled.iter().find(|p| p.seq_id == 2).unwrap();
    assert_eq!((p2.start, p2.len), (8, 1));
    let (t1, t2) = (
        s.get(1).unwrap().block_table.clone(),
        s.get(2).unwrap().block_table.clone(),
    );
    assert_eq!(t1[..2], t2[..2]);
    assert_eq!(s.block_manager().ref_count(t1[0]), 2);
    s.check_invariants();
    s.remove(1);
    assert_eq!(s.block_manager().ref_count(t1[0]), 1);
    s.remove(2);
    assert_eq!(s.block_manager().num_used(), 0);
    s.check_invariants();
}

#[test]
fn a_sequence_waits_at_an_image_not_yet_encoded_and_others_go_first() {
    let mut s = Scheduler::new(BlockManager::new(64, 4, false), 4, 100);
    // Sequence 1's image placeholders are tokens 4..8 of 12; its features are not ready.
    s.add(Sequence::new(1, (0..12).collect(), 0, 1));
    s.set_encoder_waits(1, &[(4, 8)]);
    s.add(Sequence::new(2, (0..5).collect(), 0, 2));
    let plan = s.schedule();
    let got: Vec<_> = plan
        .scheduled
        .iter()
        .map(|p| (p.seq_id, p.start, p.len, p.sample))
        .collect();
    assert_eq!(
        got,
        vec![(1, 0, 4, false), (2, 0, 5, true)],
        "the text before the image runs"
    );
    s.commit(&plan);
    s.append_token(2, 9);
    let plan = s.schedule();
    let got: Vec<_> = plan
        .scheduled
        .iter()
        .map(|p| (p.seq_id, p.start, p.len))
        .collect();
    assert_eq!(got, vec![(2, 5, 1)], "sequence 1 waits; sequence 2 decodes");
    s.commit(&plan);
    s.append_token(2, 9);
    // The image is encoded: the rest of the prompt runs in one chunk.
    s.set_encoder_waits(1, &[]);
    let plan = s.schedule();
    let got: Vec<_> = plan
        .scheduled
        .iter()
        .map(|p| (p.seq_id, p.start, p.len, p.sample))
        .collect();
    assert_eq!(got, vec![(1, 4, 8, true), (2, 6, 1, true)]);
    s.check_invariants();

    // A waiting sequence whose first token is an image not yet encoded keeps its place without
    // holding blocks, and the sequence behind it is admitted.
    let mut s = Scheduler::new(BlockManager::new(64, 4, false), 4, 100);
    s.add(Sequence::new(1, (0..12).collect(), 0, 1));
    s.set_encoder_waits(1, &[(0, 8)]);
    s.add(Sequence::new(2, (0..5).collect(), 0, 2));
    let plan = s.schedule();
    assert_eq!(
        plan.scheduled.iter().map(|p| p.seq_id).collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(
        (s.num_waiting(), s.get(1).unwrap().block_table.len()),
        (1, 0)
    );
    s.check_invariants();
}
