//! CPU-affinity worker threads.
//!
//! The engine thread and the compute pool can be pinned to configured cores with
//! `sched_setaffinity`. Cores are checked against the set this process may run on (which inside a
//! cgroup or cpuset can be smaller than the machine), so a core that does not exist or is not
//! allowed is a clear error rather than a silent no-op.

use crate::config::ThreadingConfig;
use crate::error::{Error, Result};

/// The affinity mask of the calling thread, ascending.
pub fn current_thread_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and the size passed is its own.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is this thread; `set` is a valid, writable cpu_set_t of the given size.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc == 0 {
            // SAFETY: CPU_ISSET reads the initialised set for indices below CPU_SETSIZE.
            return (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect();
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// The cores this process may run on (inside a cgroup or cpuset, possibly fewer than the machine
/// has), ascending. Taken from the first thread that asks, before autoglm pins anything, so that a
/// pinned thread (and the threads it spawns, which inherit its mask) still sees the whole set.
pub fn allowed_cores() -> Vec<usize> {
    static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    ALLOWED.get_or_init(current_thread_cores).clone()
}

/// Checks that every core in `cores` is one this process may run on.
pub fn check_cores(cores: &[usize]) -> Result<()> {
    let allowed = allowed_cores();
    for &c in cores {
        if !allowed.contains(&c) {
            return Err(Error::Affinity(format!(
                "core {c} is not available to this process (allowed cores: {allowed:?})"
            )));
        }
    }
    Ok(())
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<()> {
    pin_current_thread_to(&[core])
}

/// Sets the calling thread's nice value (Linux: per thread; elsewhere nothing happens).
/// Raising it needs no privilege; lowering it below the current value may.
pub fn set_current_thread_nice(nice: i32) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS and a thread id
        // changes only that thread's priority.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            return Err(Error::Affinity(format!(
                "setpriority(nice {nice}): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
    Ok(())
}

/// Restricts the calling thread to `cores` (the scheduler picks among them).
pub fn pin_current_thread_to(cores: &[usize]) -> Result<()> {
    check_cores(cores)?;
    if cores.is_empty() {
        return Err(Error::Affinity("no core to pin to".into()));
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in `allowed_cores`; every core is below CPU_SETSIZE because it is in the
        // allowed set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &core in cores {
            // SAFETY: `set` is a valid cpu_set_t and `core` < CPU_SETSIZE.
            unsafe { libc::CPU_SET(core, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; `set` is valid for the size given.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(Error::Affinity(format!(
                "sched_setaffinity({cores:?}): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The default layout of a serving process on a machine with two cores or more: the engine loop
/// on the first core this process may use, its socket threads on the others (so the loop never
/// waits behind socket work). `None` with a single core.
pub fn serving_layout() -> Option<(usize, Vec<usize>)> {
    let cores = allowed_cores();
    let (&engine, rest) = cores.split_first()?;
    (!rest.is_empty()).then(|| (engine, rest.to_vec()))
}

/// Builds the compute pool described by `cfg`, each worker pinned to its core when cores are given.
pub fn build_compute_pool(cfg: &ThreadingConfig) -> Result<rayon::ThreadPool> {
    check_cores(&cfg.compute_cores)?;
    if let Some(c) = cfg.engine_core {
        check_cores(&[c])?;
    }
    let threads = cfg
        .num_threads
        .unwrap_or_else(|| allowed_cores().len().max(1));
    build_pool("autoglm-compute", &cfg.compute_cores, threads)
}

/// A rayon pool of threads named `{name}-{i}`: one per entry of `cores`, each pinned to it, or
/// `threads` of them (at least one) free to run on any core this process may use.
pub fn build_pool(name: &str, cores: &[usize], threads: usize) -> Result<rayon::ThreadPool> {
    build_pool_niced(name, cores, threads, 0)
}

/// [`build_pool`] whose threads run at scheduling priority `nice` (Linux's per-thread nice value,
/// -20..19; 0 leaves it). A positive value lets threads of normal priority (the engine's decode
/// steps) take a shared core first, so throughput work fills only the time they leave.
pub fn build_pool_niced(
    name: &str,
    cores: &[usize],
    threads: usize,
    nice: i32,
) -> Result<rayon::ThreadPool> {
    check_cores(cores)?;
    if !(-20..=19).contains(&nice) {
        return Err(Error::Affinity(format!(
            "nice value {nice} is outside -20..19"
        )));
    }
    let threads = if cores.is_empty() {
        threads.max(1)
    } else {
        cores.len()
    };
    let cores = cores.to_vec();
    let name = name.to_string();
    // Without cores of their own the workers may run anywhere the process may, even when the
    // thread building the pool (the engine loop) is pinned: threads inherit their creator's mask.
    let anywhere = allowed_cores();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(move |i| {
            let r = match cores.get(i) {
                Some(&core) => pin_current_thread(core),
                None => pin_current_thread_to(&anywhere),
            };
            // Checked above against the process's cores; a failure here (the mask changed under
            // us) leaves the worker where it was, which costs speed, not correctness.
            if let Err(e) = r {
                tracing::warn!(target: "autoglm::threading", error = %e, "cannot pin a worker thread");
            }
            if nice != 0 {
                if let Err(e) = set_current_thread_nice(nice) {
                    tracing::warn!(target: "autoglm::threading", error = %e, "cannot renice a worker thread");
                }
            }
        })
        .build()
        .map_err(|e| Error::Affinity(format!("cannot start the thread pool: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn niced_pool_threads_run_at_that_priority_and_others_do_not() {
        fn nice_of_this_thread() -> i32 {
            // SAFETY: as in set_current_thread_nice; errno is cleared first because -1 is also
            // a valid priority.
            unsafe {
                *libc::__errno_location() = 0;
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        }
        let base = nice_of_this_thread();
        let pool = build_pool_niced("test-nice", &[], 2, 7.max(base)).unwrap();
        let inside = pool.broadcast(|_| nice_of_this_thread());
        assert_eq!(inside, vec![7.max(base); 2]);
        assert_eq!(
            nice_of_this_thread(),
            base,
            "the builder's own thread is unchanged"
        );
        assert!(build_pool_niced("test-nice", &[], 1, 20).is_err());
    }

    #[test]
    fn unpinned_compute_workers_do_not_inherit_a_pinned_creators_core() {
        let allowed = allowed_cores();
        let masks = std::thread::spawn(move || {
            pin_current_thread(allowed[0]).unwrap();
            let pool = build_compute_pool(&ThreadingConfig {
                num_threads: Some(2),
                ..Default::default()
            })
            .unwrap();
            pool.broadcast(|_| current_thread_cores())
        })
        .join()
        .unwrap();
        assert_eq!(masks.len(), 2);
        for m in masks {
            assert_eq!(
                m,
                allowed_cores(),
                "a compute worker kept its creator's mask"
            );
        }
    }

    #[test]
    fn serving_layout_splits_the_allowed_cores() {
        let allowed = allowed_cores();
        match serving_layout() {
            Some((engine, rest)) => {
                assert_eq!(engine, allowed[0]);
                assert_eq!(rest, allowed[1..]);
            }
            None => assert_eq!(allowed.len(), 1),
        }
    }

    #[test]
    fn pins_a_thread_to_a_set_of_allowed_cores() {
        let allowed = allowed_cores();
        std::thread::spawn(move || {
            pin_current_thread_to(&allowed).unwrap();
            assert_eq!(current_thread_cores(), allowed);
            pin_current_thread(allowed[0]).unwrap();
            assert_eq!(current_thread_cores(), vec![allowed[0]]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn refuses_an_empty_set_and_cores_outside_the_process() {
        let err = pin_current_thread_to(&[]).unwrap_err().to_string();
        assert!(err.contains("no core"), "{err}");
        let outside = allowed_cores().last().unwrap() + 1;
        let err = pin_current_thread_to(&[outside]).unwrap_err().to_string();
        assert!(err.contains(&format!("core {outside}")), "{err}");
        // Nothing was changed by the refusals.
        assert_eq!(current_thread_cores(), allowed_cores());
    }
}
