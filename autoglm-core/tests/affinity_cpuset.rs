//! Inside a cpuset that allows fewer cores than the machine has, pinning uses only allowed cores
//! and names the allowed set when asked for another. This binary holds one test because it
//! narrows its own affinity mask (what a cgroup cpuset or `taskset` does to a process) first.

mod common;

use autoglm_core::threading::{allowed_cores, current_thread_cores};
use autoglm_core::{Engine, EngineConfig, SamplingParams};

fn restrict_to(core: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is an empty set; `core` < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is this thread; `set` is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0);
}

#[test]
fn engine_runs_inside_a_narrow_cpuset_and_rejects_other_cores() {
    let machine = current_thread_cores();
    let only = machine[0];
    restrict_to(only);
    // The first query of this process sees the narrowed set, as under a cgroup.
    assert_eq!(allowed_cores(), vec![only]);

    let mut cfg = EngineConfig::default();
    cfg.threading.engine_core = Some(only);
    cfg.threading.compute_cores = vec![only];
    let e = Engine::from_dir(&common::fixture("glm4-tiny"), cfg).unwrap();
    let out = e
        .generate(
            vec![1, 2, 3],
            SamplingParams {
                max_tokens: 4,
                ..SamplingParams::greedy()
            },
        )
        .unwrap();
    assert_eq!(out.choices[0].token_ids.len(), 4);

    // Default threading uses as many compute threads as allowed cores, not machine cores.
    let pool = autoglm_core::threading::build_compute_pool(&Default::default()).unwrap();
    assert_eq!(pool.current_num_threads(), 1);

    let other = only + 1;
    let mut cfg = EngineConfig::default();
    cfg.threading.compute_cores = vec![other];
    let err = Engine::from_dir(&common::fixture("glm4-tiny"), cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("core {other}")) && err.contains(&format!("[{only}]")),
        "{err}"
    );
}
