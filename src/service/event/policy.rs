//! The delivery policy: one table from what applying an event came to, and how often it
//! was tried, to what the consumer does with its delivery.

use std::time::Duration;

use crate::biz::{Error, ErrorKind, Outcome};

/// Internal failures of a single event are tried this often before it is dead-lettered
/// with reason `INTERNAL`.
const INTERNAL_ATTEMPTS: i64 = 3;

/// Why a delivery is dead-lettered: its `x-reject-reason` header and the `reason` label of
/// `resource_events_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The use case refused the event: the refusal's `biz::Error::reason`, a value name
    /// of `resource.v1.ErrorReason` (`INVALID_EVENT`, `MESSAGE_ID_REUSED`, …).
    Refused(&'static str),
    /// The instance still did not exist when the retries ran out.
    InstanceNotFound,
    /// Applying the event alone failed internally `INTERNAL_ATTEMPTS` times.
    Internal,
}

impl DeadLetterReason {
    /// The header value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Refused(reason) => reason,
            DeadLetterReason::InstanceNotFound => "INSTANCE_NOT_FOUND",
            DeadLetterReason::Internal => "INTERNAL",
        }
    }
}

/// What the consumer does with a delivery; every one is acknowledged afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Applied, ignored as a no-op, or a duplicate: only acknowledge.
    Ack,
    /// The instance does not exist yet: send the delivery through the retry queue with
    /// `x-retry-count` set to `retry`.
    RetryLater {
        /// The retry this is, from 1.
        retry: i64,
    },
    /// Send the delivery to the dead-letter exchange (`x-reject-reason`,
    /// `x-reject-message`).
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
        /// Human-readable cause.
        message: String,
    },
}

/// How long events for instances not created yet are retried (`data.rabbitmq.max_retries`
/// and `retry_delay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries {
    /// Trips through the retry queue before the event is dead-lettered.
    pub max: u32,
    /// How long each trip waits; only quoted in the dead-letter message.
    pub delay: Duration,
}

/// What one try at applying an event came to.
#[derive(Debug)]
pub enum Attempt {
    /// Applied, ignored as a no-op, or a duplicate.
    Done,
    /// Refused by the use case.
    Refused(Error),
    /// The instance does not exist (yet).
    Unknown,
    /// Not applied: the database is unavailable, or the batch lost every race for its
    /// rows (a usage counter another replica kept moving past a limit): others made
    /// progress, so it is applied again, never dead-lettered.
    Unavailable,
    /// Not applied: anything else went wrong.
    Internal,
}

impl From<Outcome> for Attempt {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Applied(_) | Outcome::Ignored { .. } | Outcome::Duplicate => Attempt::Done,
            Outcome::Rejected(error) => Attempt::Refused(error),
            Outcome::Unknown(_) => Attempt::Unknown,
        }
    }
}

impl Attempt {
    /// The attempt that failed with `error` before anything was applied.
    pub fn failed(error: &Error) -> Self {
        if matches!(error.kind(), ErrorKind::Unavailable | ErrorKind::Conflict) {
            Attempt::Unavailable
        } else {
            Attempt::Internal
        }
    }
}

/// The next step for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Done with: this is what becomes of the delivery.
    Settle(Disposition),
    /// Keep the delivery unacknowledged and apply the event again after a backoff.
    ApplyAgain,
}

/// The delivery policy. `earlier` counts the tries before this one, as the row needs
/// them: trips through the retry queue (`x-retry-count`) for `Unknown`, internal
/// failures of the event applied alone for `Internal`.
///
/// | attempt          | earlier                    | step                                |
/// |------------------|----------------------------|-------------------------------------|
/// | `Done`           | any                        | ack                                 |
/// | `Refused(error)` | any                        | dead-letter `error.reason()`        |
/// | `Unknown`        | `< retries.max`            | retry later, as retry `earlier + 1` |
/// | `Unknown`        | `>= retries.max`           | dead-letter `INSTANCE_NOT_FOUND`    |
/// | `Unavailable`    | any                        | apply again (never dead-lettered)   |
/// | `Internal`       | `< INTERNAL_ATTEMPTS - 1`  | apply again                         |
/// | `Internal`       | `>= INTERNAL_ATTEMPTS - 1` | dead-letter `INTERNAL`              |
pub fn policy(attempt: &Attempt, earlier: i64, retries: Retries) -> Step {
    let dead_letter = |reason, message| Step::Settle(Disposition::DeadLetter { reason, message });
    match attempt {
        Attempt::Done => Step::Settle(Disposition::Ack),
        Attempt::Refused(error) => {
            dead_letter(DeadLetterReason::Refused(error.reason()), error.to_string())
        }
        Attempt::Unknown if earlier < i64::from(retries.max) => {
            Step::Settle(Disposition::RetryLater { retry: earlier + 1 })
        }
        Attempt::Unknown => dead_letter(
            DeadLetterReason::InstanceNotFound,
            format!("instance not found after {} attempts {:?} apart", earlier + 1, retries.delay),
        ),
        Attempt::Unavailable => Step::ApplyAgain,
        Attempt::Internal if earlier + 1 < INTERNAL_ATTEMPTS => Step::ApplyAgain,
        Attempt::Internal => dead_letter(DeadLetterReason::Internal, "internal error".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const RETRIES: Retries = Retries { max: 5, delay: Duration::from_secs(2) };

    fn dead_letter(reason: DeadLetterReason, message: &str) -> Step {
        Step::Settle(Disposition::DeadLetter { reason, message: message.into() })
    }

    fn cause() -> crate::biz::SharedError {
        Arc::from(Box::<dyn std::error::Error + Send + Sync>::from("connection refused"))
    }

    #[test]
    fn an_applied_ignored_or_duplicate_event_is_acknowledged() {
        let ignored = Outcome::Ignored { instance: None, note: "already running".into() };
        let attempts = [Attempt::from(Outcome::Duplicate), Attempt::from(ignored)];

        let steps = attempts.map(|attempt| policy(&attempt, 7, RETRIES));

        assert_eq!(steps, [Step::Settle(Disposition::Ack), Step::Settle(Disposition::Ack)]);
    }

    #[test]
    fn a_refused_event_is_dead_lettered_with_the_refusal_reason() {
        let error = Error::MessageIdReused { message_id: "m-1".into() };
        let message = error.to_string();

        let step = policy(&Attempt::from(Outcome::Rejected(error)), 0, RETRIES);

        assert_eq!(step, dead_letter(DeadLetterReason::Refused("MESSAGE_ID_REUSED"), &message));
    }

    #[test]
    fn an_event_for_an_unknown_instance_is_retried_until_the_bound() {
        let unknown = Attempt::from(Outcome::Unknown(crate::biz::InstanceId::try_from(1).unwrap()));

        let steps: Vec<Step> = (0..=5).map(|earlier| policy(&unknown, earlier, RETRIES)).collect();

        let retries = (1..=5).map(|retry| Step::Settle(Disposition::RetryLater { retry }));
        assert_eq!(steps[..5], retries.collect::<Vec<_>>());
        assert_eq!(
            steps[5],
            dead_letter(
                DeadLetterReason::InstanceNotFound,
                "instance not found after 6 attempts 2s apart"
            )
        );
    }

    #[test]
    fn an_unavailable_database_is_waited_for_and_never_dead_letters() {
        let attempt = Attempt::failed(&Error::Unavailable(cause()));

        let steps: Vec<Step> = [0, 2, 100].map(|earlier| policy(&attempt, earlier, RETRIES)).into();

        assert_eq!(steps, [Step::ApplyAgain, Step::ApplyAgain, Step::ApplyAgain]);
    }

    #[test]
    fn a_batch_that_kept_losing_races_is_applied_again_and_never_dead_letters() {
        let attempt = Attempt::failed(&Error::VersionConflict { instance_id: 7 });

        let steps: Vec<Step> = [0, 2, 100].map(|earlier| policy(&attempt, earlier, RETRIES)).into();

        assert_eq!(steps, [Step::ApplyAgain, Step::ApplyAgain, Step::ApplyAgain]);
    }

    #[test]
    fn an_internal_failure_is_tried_three_times_then_dead_lettered() {
        let attempt = Attempt::failed(&Error::Internal(cause()));

        let steps: Vec<Step> = (0..3).map(|earlier| policy(&attempt, earlier, RETRIES)).collect();

        assert_eq!(
            steps,
            [
                Step::ApplyAgain,
                Step::ApplyAgain,
                dead_letter(DeadLetterReason::Internal, "internal error")
            ]
        );
    }

    #[test]
    fn reasons_read_as_the_error_reason_value_names() {
        let reasons = [
            DeadLetterReason::Refused("INVALID_EVENT"),
            DeadLetterReason::InstanceNotFound,
            DeadLetterReason::Internal,
        ];

        let names = reasons.map(DeadLetterReason::as_str);

        assert_eq!(names, ["INVALID_EVENT", "INSTANCE_NOT_FOUND", "INTERNAL"]);
        for name in names {
            assert!(crate::pb::resource::v1::ErrorReason::from_str_name(name).is_some(), "{name}");
        }
    }
}
