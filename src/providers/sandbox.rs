//! The offline provider: nothing leaves the machine. Emails become real `.eml` files (the
//! exact bytes SMTP would send, written by lettre's file transport); X and Facebook posts
//! become one JSON line each in `posts.jsonl`. Both live under the configured sandbox dir.

use super::{email, Accepted, Account, MessageProvider, OutgoingMessage, SendError};
use chrono::{SecondsFormat, Utc};
use lettre::{AsyncFileTransport, AsyncTransport, Tokio1Executor};
use messaging_domain::Channel;
use serde_json::json;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

pub struct SandboxProvider {
    dir: PathBuf,
    /// One writer at a time, so concurrent posts never interleave within a line.
    posts: Mutex<()>,
}

impl SandboxProvider {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            posts: Mutex::new(()),
        }
    }

    pub fn posts_file(&self) -> PathBuf {
        self.dir.join("posts.jsonl")
    }

    async fn ensure_dir(&self) -> Result<(), SendError> {
        // A local disk problem may well clear up (space freed, directory fixed): transient.
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| SendError::Transient {
                reason: format!("sandbox: cannot create {}: {e}", self.dir.display()),
                retry_after: None,
            })
    }

    async fn write_email(&self, message: &OutgoingMessage) -> Result<String, SendError> {
        let email = email::build(message)?;
        self.ensure_dir().await?;
        AsyncFileTransport::<Tokio1Executor>::new(&self.dir)
            .send(email)
            .await
            .map_err(|e| SendError::Transient {
                reason: format!("sandbox: cannot write the email: {e}"),
                retry_after: None,
            })
    }

    async fn append_post(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<String, SendError> {
        let id = format!("sandbox-{}", uuid::Uuid::new_v4());
        let line = json!({
            "provider_message_id": id,
            "message_id": message.message_id,
            "service_id": account.service_id,
            "channel": message.channel.as_str(),
            "from": message.from,
            "to": message.to,
            "text": message.text,
            "link": message.link,
            "in_reply_to": message.in_reply_to,
            "recorded_at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        self.ensure_dir().await?;
        let _guard = self.posts.lock().await;
        let failed = |e: std::io::Error| SendError::Transient {
            reason: format!("sandbox: cannot append to posts.jsonl: {e}"),
            retry_after: None,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.posts_file())
            .await
            .map_err(failed)?;
        file.write_all(&bytes).await.map_err(failed)?;
        file.flush().await.map_err(failed)?;
        Ok(id)
    }
}

#[async_trait::async_trait]
impl MessageProvider for SandboxProvider {
    async fn send(
        &self,
        account: &Account,
        message: &OutgoingMessage,
    ) -> Result<Accepted, SendError> {
        // Any credentials will do: the sandbox stands in for every provider.
        let result = match message.channel {
            Channel::Email => self.write_email(message).await,
            Channel::Twitter | Channel::Facebook => self.append_post(account, message).await,
        };
        match &result {
            Ok(id) => tracing::info!(
                message_id = %message.message_id,
                channel = message.channel.as_str(),
                provider_message_id = %id,
                dir = %self.dir.display(),
                "sandbox recorded the message (nothing was sent)"
            ),
            Err(error) => {
                tracing::warn!(message_id = %message.message_id, %error, "sandbox send failed")
            }
        }
        result.map(|id| Accepted {
            provider_message_id: Some(id),
        })
    }
}
