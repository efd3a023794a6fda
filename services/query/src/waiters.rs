//! `X-Min-Version` waiters, keyed by document: a waiter is woken only when its own document reaches the
//! version it needs (or when every waiter must re-read: a generation switch, a change-stream reset).
//!
//! The apply loop (or the change-stream watcher) calls [`Waiters::reached`] after a write is durable; it takes
//! the waiters of that `(entity, id)` whose version is reached out of the map and wakes them, so the cost per
//! applied document is one hash lookup, whatever the number of waiters. A waiter registers *before* it reads
//! MongoDB, so a write between its read and its wait still wakes it.

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use cqrs_events::AggregateType;
use tokio::sync::oneshot;

type Key = (AggregateType, String);

struct Waiter {
    token: u64,
    min: u64,
    wake: oneshot::Sender<()>,
}

#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<Key, Vec<Waiter>>>,
    next: AtomicU64,
}

/// A registered waiter; dropping it unregisters it.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    key: Key,
    token: u64,
    /// Resolves when the document reached the version (or everyone must re-read).
    pub woken: oneshot::Receiver<()>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Vec<Waiter>>> {
        // A panic while holding the lock cannot leave the map inconsistent (every operation is one push,
        // retain or remove), so a poisoned lock is still usable.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a waiter for `(entity, id)` at version `min` or later.
    pub fn register(&self, entity: AggregateType, id: &str, min: u64) -> Registration<'_> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (wake, woken) = oneshot::channel();
        let key = (entity, id.to_owned());
        self.lock()
            .entry(key.clone())
            .or_default()
            .push(Waiter { token, min, wake });
        Registration {
            waiters: self,
            key,
            token,
            woken,
        }
    }

    /// `(entity, id)` is durably at `version`: wakes its waiters that need no more than that.
    pub fn reached(&self, entity: AggregateType, id: &str, version: u64) {
        let mut map = self.lock();
        let key = (entity, id.to_owned());
        let Some(list) = map.get_mut(&key) else {
            return;
        };
        let mut i = 0;
        while i < list.len() {
            if list[i].min <= version {
                let w = list.swap_remove(i);
                let _ = w.wake.send(());
            } else {
                i += 1;
            }
        }
        if list.is_empty() {
            map.remove(&key);
        }
    }

    /// Wakes every waiter (they re-read): reads moved to another generation, or changes may have been missed.
    pub fn wake_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for w in all.into_values().flatten() {
            let _ = w.wake.send(());
        }
    }

    /// Registered waiters (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some(list) = map.get_mut(&self.key) {
            list.retain(|w| w.token != self.token);
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_documents_own_waiters_at_a_reached_version_wake() {
        let w = Waiters::default();
        let mut a3 = w.register(AggregateType::User, "a", 3);
        let mut a5 = w.register(AggregateType::User, "a", 5);
        let mut b1 = w.register(AggregateType::User, "b", 1);
        let mut pa = w.register(AggregateType::Product, "a", 1);
        w.reached(AggregateType::User, "a", 4);
        assert!(a3.woken.try_recv().is_ok());
        assert!(a5.woken.try_recv().is_err());
        assert!(b1.woken.try_recv().is_err());
        assert!(pa.woken.try_recv().is_err());
        assert_eq!(w.len(), 3);
        w.reached(AggregateType::User, "a", 5);
        assert!(a5.woken.try_recv().is_ok());
        assert_eq!(w.len(), 2);
        w.wake_all();
        assert!(b1.woken.try_recv().is_ok() && pa.woken.try_recv().is_ok());
        assert!(w.is_empty());
    }

    #[test]
    fn a_dropped_registration_leaves_nothing_behind() {
        let w = Waiters::default();
        let r = w.register(AggregateType::Order, "x", 2);
        let keep = w.register(AggregateType::Order, "x", 9);
        drop(r);
        assert_eq!(w.len(), 1);
        drop(keep);
        assert!(w.is_empty());
        w.reached(AggregateType::Order, "x", 10);
    }
}
