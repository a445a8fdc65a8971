//! Domain lifecycle events: the manager reports each change of a domain's
//! life (defined, started, paused, stopped and why...) here, and every
//! front end that wants them (libvirt's `virsh event`, virt-manager)
//! subscribes. Each subscriber has a bounded queue: one that stops reading
//! loses events past it, never slows the manager or grows its memory.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

/// What happened to a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// A definition was stored: new (`updated` false) or replacing one.
    Defined {
        /// Whether it replaced an earlier definition.
        updated: bool,
    },
    /// The definition was removed.
    Undefined,
    /// A VMM started running it.
    Started,
    /// Its vCPUs were paused.
    Suspended,
    /// Its vCPUs run again.
    Resumed,
    /// It is no longer running.
    Stopped(StopReason),
    /// It crashed and is kept as it was (`on_crash` preserve).
    Crashed,
}

/// Why a domain stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest shut down.
    Shutdown,
    /// It was destroyed.
    Destroyed,
    /// The guest or its VMM crashed.
    Crashed,
    /// The VMM failed.
    Failed,
    /// It was saved (`save`, `managedsave`).
    Saved,
    /// A snapshot was reverted to (the run it had ended).
    FromSnapshot,
}

impl StopReason {
    /// The reason `domstate --reason` gives.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Destroyed => "destroyed",
            Self::Crashed => "crashed",
            Self::Failed => "failed",
            Self::Saved => "saved",
            Self::FromSnapshot => "from snapshot",
        }
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEvent {
    /// The domain's name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its id while running (after `Started`, before `Stopped`).
    pub id: Option<u32>,
    /// What happened.
    pub what: Lifecycle,
}

/// Events a subscriber may have waiting before later ones are dropped for it.
pub const QUEUE: usize = 1024;

/// Where the manager sends events.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<SyncSender<DomainEvent>>>,
}

impl EventBus {
    /// A new subscriber's queue: every event from now on.
    pub fn subscribe(&self) -> Receiver<DomainEvent> {
        let (tx, rx) = sync_channel(QUEUE);
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// Sends `ev` to every subscriber; subscribers that are gone are
    /// forgotten, ones whose queue is full miss it.
    pub fn emit(&self, ev: DomainEvent) {
        tracing::debug!(name = %ev.name, what = ?ev.what, "domain event");
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| match s.try_send(ev.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                tracing::warn!("an event subscriber is not reading: an event for '{}' was dropped for it", ev.name);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> DomainEvent {
        DomainEvent { name: format!("d{n}"), uuid: String::new(), id: Some(n), what: Lifecycle::Started }
    }

    #[test]
    fn subscribers_get_events_in_order_and_a_slow_one_only_loses_its_own() {
        let bus = EventBus::default();
        let fast = bus.subscribe();
        let slow = bus.subscribe();
        for n in 0..(QUEUE as u32 + 10) {
            bus.emit(ev(n));
            assert_eq!(fast.try_recv().unwrap(), ev(n));
        }
        // The slow one holds the first QUEUE events; the rest were dropped for it alone.
        assert_eq!(slow.try_iter().count(), QUEUE);
        drop(slow);
        bus.emit(ev(1));
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1, "a subscriber that is gone is forgotten");
    }
}
