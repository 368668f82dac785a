//! Instance ids: positive snowflake ids, checked where they enter.

use std::fmt;

use super::Error;

/// Snowflake id of an instance; always positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(i64);

impl InstanceId {
    /// An id the snowflake generator made (not checked: it is ours, not a client's).
    pub(super) fn generated(id: i64) -> Self {
        InstanceId(id)
    }

    /// The raw id.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for InstanceId {
    type Error = Error;

    /// # Errors
    /// `InvalidArgument` unless `id > 0`.
    fn try_from(id: i64) -> Result<Self, Error> {
        if id > 0 {
            Ok(InstanceId(id))
        } else {
            Err(Error::invalid("instance_id", format!("must be a positive integer, got {id}")))
        }
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
