//! `ExplainResource`: an instance's explanation as `resource.v1.Explanation`.

use super::{Caller, ResourceService, timestamp};
use crate::{
    biz::{
        Error, InstanceId,
        explain::{ClusterEvent, Condition, Explanation},
    },
    pb::resource::v1 as pb,
};

impl ResourceService {
    /// `ExplainResource`: why the instance is (not) in the state it should be, for
    /// whoever may get it. A cluster that does not answer is not an error: the
    /// explanation then comes from the database and says so.
    ///
    /// # Errors
    /// `InvalidArgument` (id), `InstanceNotFound`, `Unavailable` (the database).
    pub async fn explain_resource(
        &self,
        caller: &Caller,
        req: pb::ExplainResourceRequest,
    ) -> Result<pb::Explanation, Error> {
        let id = InstanceId::try_from(req.instance_id)?;
        let instance = self.visible(caller, id).await?;
        Ok(pb::Explanation::from(self.explains.explain(instance).await))
    }
}

impl From<Explanation> for pb::Explanation {
    fn from(e: Explanation) -> Self {
        pb::Explanation {
            resource: Some(pb::Resource::from(e.instance)),
            summary: e.summary,
            conditions: e.conditions.into_iter().map(pb::Condition::from).collect(),
            events: e.events.into_iter().map(pb::ClusterEvent::from).collect(),
            source: e.source.as_str().to_owned(),
        }
    }
}

impl From<Condition> for pb::Condition {
    fn from(c: Condition) -> Self {
        pb::Condition {
            r#type: c.kind,
            status: c.status,
            reason: c.reason,
            message: c.message,
            last_transition_time: c.last_transition.map(timestamp),
        }
    }
}

impl From<ClusterEvent> for pb::ClusterEvent {
    fn from(e: ClusterEvent) -> Self {
        pb::ClusterEvent {
            r#type: e.kind,
            reason: e.reason,
            message: e.message,
            count: e.count,
            last_seen: e.last_seen.map(timestamp),
        }
    }
}
