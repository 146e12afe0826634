//! The `vigil` binary's library: the commands, so that tests drive exactly the code the binary runs.

pub mod adl;
pub mod book;
pub mod cluster;
pub mod config;
pub mod export;
pub mod fuzzing;
pub mod handoff;
pub mod http;
pub mod httpc;
pub mod hub;
pub mod inspect;
pub mod intake;
pub mod load;
pub mod metrics;
pub mod persist;
pub mod pipeline;
pub mod producers;
pub mod recovery;
pub mod replay;
pub mod serve;
pub mod stress;
pub mod sync;
pub mod tcp;
pub mod wire;

/// Ends the process after a broken invariant the node cannot run past honestly (a dead shard, a poisoned lock,
/// shards that disagree): the message on stderr, exit code 70 (`EX_SOFTWARE`). Going on would publish state that
/// is wrong or stale; a restart recovers from the journal and the checkpoints.
pub fn fatal(message: impl std::fmt::Display) -> ! {
    eprintln!("vigil: fatal: {message}");
    std::process::exit(70)
}

/// Spawns a thread the node cannot run without: a panic in it (a broken invariant) ends the process through
/// [`fatal`] instead of leaving the node half alive.
pub fn spawn_vital<T: Send + 'static>(
    name: &str,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let label = name.to_owned();
    std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(value) => value,
            Err(panic) => fatal(format!("thread {label} panicked: {}", panic_message(&*panic))),
        }
    })
}

/// The text of a panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)")
}

/// Locks `mutex`; a poisoned lock (a thread panicked while holding it, so what it guards may be half updated)
/// is [`fatal`]: serving from it would answer with state no invariant covers.
pub fn lock<'a, T>(mutex: &'a std::sync::Mutex<T>, what: &str) -> std::sync::MutexGuard<'a, T> {
    mutex.lock().unwrap_or_else(|_| fatal(format!("the lock on {what} is poisoned (a thread panicked holding it)")))
}

/// [`lock`] for reading a `RwLock`.
pub fn read<'a, T>(lock: &'a std::sync::RwLock<T>, what: &str) -> std::sync::RwLockReadGuard<'a, T> {
    lock.read().unwrap_or_else(|_| fatal(format!("the lock on {what} is poisoned (a thread panicked holding it)")))
}

/// [`lock`] for writing a `RwLock`.
pub fn write<'a, T>(lock: &'a std::sync::RwLock<T>, what: &str) -> std::sync::RwLockWriteGuard<'a, T> {
    lock.write().unwrap_or_else(|_| fatal(format!("the lock on {what} is poisoned (a thread panicked holding it)")))
}
