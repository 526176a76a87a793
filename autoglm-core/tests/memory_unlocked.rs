//! When `RLIMIT_MEMLOCK` refuses to lock a buffer, the pool still hands it out, unlocked, and
//! counts it. Its own test binary (one test), since it lowers a process-wide limit.
#![cfg(target_os = "linux")]

use autoglm_core::memory::PinnedPool;

/// Linux capability number of CAP_IPC_LOCK, which lets a thread lock memory past the limit.
const CAP_IPC_LOCK: u32 = 14;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops CAP_IPC_LOCK from the calling thread's effective set (capabilities are per thread).
fn drop_ipc_lock_capability() {
    let mut header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData records for version 3; both pointers are valid.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    // SAFETY: as above; lowering the effective set is always allowed.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

fn memlock_limit() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to write.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    assert_eq!(rc, 0);
    lim
}

#[test]
fn a_buffer_the_limit_refuses_to_lock_is_kept_unlocked_and_counted() {
    let pool = PinnedPool::default();
    // Where locking is allowed, small buffers are locked.
    let lim = memlock_limit();
    // SAFETY: geteuid has no preconditions.
    let privileged = unsafe { libc::geteuid() } == 0 || lim.rlim_cur == libc::RLIM_INFINITY;
    let first = pool.take(4096).unwrap();
    if privileged {
        assert!(first.is_locked());
    }

    // No locked memory allowed any more, for this process and (for root) this thread.
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `zero` is a valid rlimit; lowering the soft limit is always allowed.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero) };
    assert_eq!(rc, 0);
    drop_ipc_lock_capability();

    let mut buf = pool.take(64 * 1024).unwrap();
    assert!(!buf.is_locked());
    buf.fill(0x5a);
    assert!(buf.iter().all(|&b| b == 0x5a));
    let s = pool.stats();
    assert_eq!(s.unlocked, 1, "{s:?}");
    assert_eq!(s.locked + s.unlocked, 2);
    assert_eq!(s.refused, 0);
    drop((first, buf));
    assert_eq!(pool.trim(), 4096 + 64 * 1024);
    assert_eq!((pool.stats().locked, pool.stats().unlocked), (0, 0));
}
