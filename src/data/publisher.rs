//! `StatusPublisher` on RabbitMQ: `mq.v1.InstanceStatusChanged` to the event exchange with
//! routing key `status_routing_key`, persistent, `mandatory`, with publisher confirms.
//!
//! An unroutable message is still confirmed by the broker (amqp-rs/lapin#252): with
//! `mandatory` it is also returned, and a returned message counts as not sent.

use async_trait::async_trait;
use lapin::{BasicProperties, Channel, Confirmation, Connection, options::BasicPublishOptions};
use prost::Message;
use tokio::sync::Mutex;

use crate::{
    amqp::{self, STATUS_EVENT_TYPE},
    biz::{Pending, RepoError, StatusPublisher},
    conf,
    pb::mq::v1 as pb,
};

/// Publishes status changes over one lazily (re)opened connection.
pub struct AmqpStatusPublisher {
    conf: conf::RabbitMq,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl AmqpStatusPublisher {
    /// A publisher to the broker of `conf`; it connects on first use.
    pub fn new(conf: conf::RabbitMq) -> Self {
        Self { conf, link: Mutex::new(None) }
    }

    async fn channel(
        &self,
        link: &mut Option<(Connection, Channel)>,
    ) -> Result<Channel, RepoError> {
        if let Some((conn, channel)) = link.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *link = None;
        let unavailable = |e: amqp::AmqpError| RepoError::Unavailable(e.into());
        let conn =
            amqp::connect(&self.conf, "resource-status-publisher").await.map_err(unavailable)?;
        amqp::declare_topology(&self.conf, &conn).await.map_err(unavailable)?;
        let channel = amqp::confirm_channel(&self.conf, &conn).await.map_err(unavailable)?;
        *link = Some((conn, channel.clone()));
        Ok(channel)
    }
}

fn message(p: &Pending) -> pb::InstanceStatusChanged {
    pb::InstanceStatusChanged {
        instance_id: p.change.instance_id.get(),
        user_id: p.change.user_id.clone(),
        status: p.change.status.as_str().to_owned(),
        reason: p.change.reason.clone(),
        endpoint: p.change.endpoint.clone(),
        timestamp: p.change.at.timestamp(),
        version: p.change.version,
    }
}

#[async_trait]
impl StatusPublisher for AmqpStatusPublisher {
    async fn publish(&self, batch: &[Pending]) -> Result<Vec<i64>, RepoError> {
        let mut link = self.link.lock().await;
        let channel = self.channel(&mut link).await?;
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let mut confirms = Vec::with_capacity(batch.len());
        for p in batch {
            let properties = BasicProperties::default()
                .with_content_type("application/x-protobuf".into())
                .with_type(STATUS_EVENT_TYPE.into())
                .with_message_id(format!("{}-{}", p.change.instance_id, p.change.version).into())
                .with_timestamp(u64::try_from(p.change.at.timestamp()).unwrap_or_default())
                .with_delivery_mode(2);
            let body = message(p).encode_to_vec();
            let publish = channel.basic_publish(
                self.conf.exchange.as_str().into(),
                self.conf.status_routing_key.as_str().into(),
                options,
                &body,
                properties,
            );
            let sent =
                amqp::bounded("publish a status event", self.conf.connect_timeout, publish).await;
            match sent {
                Ok(confirm) => confirms.push((p.id, confirm)),
                Err(e) => {
                    *link = None;
                    return Err(RepoError::Unavailable(e.into()));
                }
            }
        }
        let mut sent = Vec::with_capacity(confirms.len());
        for (id, confirm) in confirms {
            // A confirm that never comes (a silent link) leaves the row in the outbox.
            match amqp::bounded("confirm a status event", self.conf.connect_timeout, confirm).await
            {
                Ok(Confirmation::Ack(None)) => sent.push(id),
                Ok(
                    Confirmation::Ack(Some(_)) | Confirmation::Nack(_) | Confirmation::NotRequested,
                ) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "status publisher lost its channel");
                    *link = None;
                    break;
                }
            }
        }
        Ok(sent)
    }
}
