//! Faults injected in front of the handlers, as a fault-injecting proxy would.
//!
//! A [`Fault`] names the requests it matches (verb, kind, object name; unset fields match
//! everything) and what happens to them ([`FaultAction`]). The HTTP layer asks
//! [`Faults::take`] for every request once it has been counted and logged.

use std::time::Duration;

use crate::{Kind, Verb};

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultAction {
    /// Answers a Kubernetes `Status` with this HTTP code instead of serving the request.
    ///
    /// `retry_after` adds `details.retryAfterSeconds` and a `Retry-After` header. On a
    /// watch, code 410 is sent as the API server sends an expired version: an `ERROR` event
    /// in a 200 stream (so kube's watcher relists); other codes are the HTTP status.
    Status {
        /// The HTTP status code and the `Status`'s `code` (500 when not a valid HTTP code).
        code: u16,
        /// The `Status`'s `reason`, e.g. `ServiceUnavailable`.
        reason: String,
        /// The `Status`'s `message`.
        message: String,
        /// Seconds the client is asked to wait before retrying.
        retry_after: Option<u32>,
    },
    /// Never answers: the request stays pending until the client gives up or the fake
    /// shuts down.
    Hang,
    /// Waits this long, then serves the request normally.
    Delay(Duration),
}

/// A fault to inject with [`crate::FakeKube::inject`]; every field that is set must match.
///
/// ```
/// use fake_kube::{Fault, Kind, Verb};
///
/// let fault = Fault::status(503, "ServiceUnavailable")
///     .retry_after(2)
///     .verb(Verb::Patch)
///     .kind(Kind::Pod)
///     .name("inst-7")
///     .times(3);
/// assert_eq!(fault.times, Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Only requests of this verb.
    pub verb: Option<Verb>,
    /// Only requests addressing this kind (discovery requests have none).
    pub kind: Option<Kind>,
    /// Only requests naming this object in the URL (a collection request has no name).
    pub name: Option<String>,
    /// What happens to a matching request.
    pub action: FaultAction,
    /// How many matching requests it still applies to; `None` is forever.
    pub times: Option<u32>,
}

/// Identifies an injected fault, to remove it with [`crate::FakeKube::remove_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FaultId(u64);

impl Fault {
    /// A fault doing `action` to every request, forever; narrow it with the builder methods.
    pub fn new(action: FaultAction) -> Fault {
        Fault { verb: None, kind: None, name: None, action, times: None }
    }

    /// Answers a `Status` with `code` and `reason` (and a generic message, see
    /// [`Fault::message`]).
    pub fn status(code: u16, reason: impl Into<String>) -> Fault {
        let reason = reason.into();
        let message = format!("fake-kube injected a fault: {code} {reason}");
        Fault::new(FaultAction::Status { code, reason, message, retry_after: None })
    }

    /// Never answers.
    pub fn hang() -> Fault {
        Fault::new(FaultAction::Hang)
    }

    /// Answers normally after `delay`.
    pub fn delay(delay: Duration) -> Fault {
        Fault::new(FaultAction::Delay(delay))
    }

    /// Sets the `Status`'s message; no effect on other actions.
    pub fn message(mut self, text: impl Into<String>) -> Fault {
        if let FaultAction::Status { message, .. } = &mut self.action {
            *message = text.into();
        }
        self
    }

    /// Asks the client to retry after `seconds`; no effect on other actions.
    pub fn retry_after(mut self, seconds: u32) -> Fault {
        if let FaultAction::Status { retry_after, .. } = &mut self.action {
            *retry_after = Some(seconds);
        }
        self
    }

    /// Matches only requests of `verb`.
    pub fn verb(mut self, verb: Verb) -> Fault {
        self.verb = Some(verb);
        self
    }

    /// Matches only requests addressing `kind`.
    pub fn kind(mut self, kind: Kind) -> Fault {
        self.kind = Some(kind);
        self
    }

    /// Matches only requests naming the object `name`.
    pub fn name(mut self, name: impl Into<String>) -> Fault {
        self.name = Some(name.into());
        self
    }

    /// Applies to the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }

    fn matches(&self, verb: Verb, kind: Option<Kind>, name: &str) -> bool {
        self.verb.is_none_or(|v| v == verb)
            && self.kind.is_none_or(|k| Some(k) == kind)
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.times != Some(0)
    }
}

/// The injected faults, in injection order.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    next_id: u64,
    active: Vec<(FaultId, Fault)>,
}

impl Faults {
    pub(crate) fn insert(&mut self, fault: Fault) -> FaultId {
        self.next_id += 1;
        let id = FaultId(self.next_id);
        self.active.push((id, fault));
        id
    }

    pub(crate) fn remove(&mut self, id: FaultId) {
        self.active.retain(|(i, _)| *i != id);
    }

    pub(crate) fn clear(&mut self) {
        self.active.clear();
    }

    /// The action of the first matching fault, counting one use of it (an exhausted fault
    /// is dropped).
    pub(crate) fn take(
        &mut self,
        verb: Verb,
        kind: Option<Kind>,
        name: &str,
    ) -> Option<FaultAction> {
        let at = self.active.iter().position(|(_, f)| f.matches(verb, kind, name))?;
        let fault = &mut self.active[at].1;
        let action = fault.action.clone();
        if let Some(times) = &mut fault.times {
            *times -= 1;
            if *times == 0 {
                self.active.remove(at);
            }
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_fault_applies_and_counts_down() {
        let mut faults = Faults::default();
        faults.insert(Fault::hang().verb(Verb::Get).name("a").times(1));
        faults.insert(Fault::delay(Duration::from_millis(1)).kind(Kind::Pod));

        let first = faults.take(Verb::Get, Some(Kind::Pod), "a");
        let second = faults.take(Verb::Get, Some(Kind::Pod), "a");
        let other_kind = faults.take(Verb::Get, Some(Kind::Service), "a");

        assert_eq!(first, Some(FaultAction::Hang));
        assert_eq!(second, Some(FaultAction::Delay(Duration::from_millis(1))));
        assert_eq!(other_kind, None);
    }

    #[test]
    fn a_named_fault_does_not_match_a_collection() {
        let mut faults = Faults::default();
        let id = faults.insert(Fault::status(500, "InternalError").name("a"));

        assert_eq!(faults.take(Verb::List, Some(Kind::Pod), ""), None);
        assert!(faults.take(Verb::Delete, Some(Kind::Pod), "a").is_some());
        faults.remove(id);
        assert_eq!(faults.take(Verb::Delete, Some(Kind::Pod), "a"), None);
    }
}
