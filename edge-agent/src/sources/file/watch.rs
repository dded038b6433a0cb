//! Change notifications shared by the file sources: one `notify` watcher (an inotify instance
//! and its thread on Linux) per watched folder for the whole process, however many sources
//! watch it. Each subscriber is woken (a bounded, one-slot channel: a pending wake-up is
//! enough) on every change in the folder; the sources decide what changed by polling their
//! files. Four sources tailing files of one folder used to run four watchers, each woken by
//! every write of every file: four times the threads and the task switches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use notify::Watcher as _;

type Wakers = Arc<Mutex<Vec<(u64, SyncSender<()>)>>>;

/// One folder's watcher and who it wakes.
struct Shared {
    wakers: Wakers,
    _watcher: notify::RecommendedWatcher,
}

/// The watchers alive, by (folder, recursive). Weak: a watcher lives as long as a subscription.
type Watchers = HashMap<(PathBuf, bool), Weak<Shared>>;
static WATCHERS: LazyLock<Mutex<Watchers>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A source's interest in a folder: while it lives, changes there wake its channel.
pub struct Subscription {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.shared.wakers).retain(|(id, _)| *id != self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wakes `wake` on every change in `dir` (and below it when `recursive`), sharing the folder's
/// watcher with the other subscribers. Err: the folder cannot be watched (the source polls).
pub fn subscribe(dir: &Path, recursive: bool, wake: SyncSender<()>) -> notify::Result<Subscription> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut watchers = lock(&WATCHERS);
    watchers.retain(|_, w| w.strong_count() > 0);
    let key = (dir.to_owned(), recursive);
    let shared = match watchers.get(&key).and_then(Weak::upgrade) {
        Some(shared) => shared,
        None => {
            let wakers: Wakers = Arc::default();
            let to_wake = wakers.clone();
            let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
                for (_, wake) in lock(&to_wake).iter() {
                    let _ = wake.try_send(());
                }
            })?;
            let mode = if recursive { notify::RecursiveMode::Recursive } else { notify::RecursiveMode::NonRecursive };
            watcher.watch(dir, mode)?;
            let shared = Arc::new(Shared { wakers, _watcher: watcher });
            watchers.insert(key, Arc::downgrade(&shared));
            shared
        }
    };
    lock(&shared.wakers).push((id, wake));
    Ok(Subscription { shared, id })
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::time::Duration;

    use super::*;

    fn woken(rx: &Receiver<()>) -> bool {
        // Drain what is pending, then wait for the next wake-up.
        rx.recv_timeout(Duration::from_secs(5)).is_ok()
    }

    fn n_watchers(dir: &Path) -> usize {
        lock(&WATCHERS).iter().filter(|((d, _), w)| d == dir && w.strong_count() > 0).count()
    }

    #[test]
    fn sources_watching_one_folder_share_one_watcher_and_are_all_woken() {
        let dir = tempfile::tempdir().unwrap();
        let (tx_a, rx_a) = sync_channel(1);
        let (tx_b, rx_b) = sync_channel(1);
        let a = subscribe(dir.path(), false, tx_a).unwrap();
        let b = subscribe(dir.path(), false, tx_b).unwrap();
        assert!(Arc::ptr_eq(&a.shared, &b.shared), "one watcher for the folder");
        assert_eq!(n_watchers(dir.path()), 1);

        std::fs::write(dir.path().join("x.log"), "line\n").unwrap();
        assert!(woken(&rx_a) && woken(&rx_b), "every subscriber woken");

        // One leaves: the other is still woken; the last one leaving stops the watcher.
        drop(a);
        while rx_b.try_recv().is_ok() {}
        std::fs::write(dir.path().join("y.log"), "line\n").unwrap();
        assert!(woken(&rx_b));
        drop(b);
        assert_eq!(n_watchers(dir.path()), 0, "no subscriber, no watcher");

        // A folder that cannot be watched is an error (the source then polls).
        let (tx, _rx) = sync_channel(1);
        assert!(subscribe(&dir.path().join("missing"), false, tx).is_err());
    }
}
