//! The offline provider: nothing leaves the machine. Emails become real `.eml` files (the
//! exact bytes SMTP would send, named as lettre's file transport names them); X and Facebook posts
//! become one JSON line each in `posts.jsonl`. Both live under the configured sandbox dir.

use super::{email, Accepted, Account, MessageProvider, OutgoingMessage, SendError};
use chrono::{SecondsFormat, Utc};
use messaging_domain::Channel;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
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

    /// Runs `write` (a file's write in the sandbox's directory, named by `what` in errors) in
    /// one trip to Tokio's blocking pool, making the directory only when `write` finds it
    /// missing, then running it again. Before, a check of the directory and then the write
    /// took two trips per message, and under "send now" the pool's threads waking and sleeping
    /// were 13 % of the process's samples.
    async fn in_dir(
        &self,
        what: &str,
        write: impl Fn() -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), SendError> {
        let dir = self.dir.clone();
        let written = tokio::task::spawn_blocking(move || match write() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir)?;
                write()
            }
            other => other,
        })
        .await;
        // A local disk problem may well clear up (space freed, directory fixed): transient.
        let reason = match written {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("sandbox: cannot {what} under {}: {e}", self.dir.display()),
            Err(e) => format!("sandbox: stopped before it could {what}: {e}"),
        };
        Err(SendError::Transient {
            reason,
            retry_after: None,
        })
    }

    /// Writes `<uuid>.eml` as lettre's file transport does (the id is the file's stem).
    async fn write_email(&self, message: &OutgoingMessage) -> Result<String, SendError> {
        let bytes = email::build(message)?.formatted();
        let id = uuid::Uuid::new_v4().to_string();
        let file = self.dir.join(format!("{id}.eml"));
        self.in_dir("write the email", move || std::fs::write(&file, &bytes))
            .await?;
        Ok(id)
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
        let path = self.posts_file();
        let _guard = self.posts.lock().await;
        self.in_dir("append to posts.jsonl", move || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?
                .write_all(&bytes)
        })
        .await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Credentials, Provider};
    use messaging_domain::{MessageId, Profile, ServiceId};

    fn email() -> OutgoingMessage {
        OutgoingMessage {
            message_id: MessageId::from_uuid(uuid::Uuid::now_v7()),
            channel: Channel::Email,
            from: Profile::new("news@example.com", Some("Example News".into())),
            to: vec![Profile::new("ann@example.org", None)],
            subject: Some("Hello".into()),
            text: Some("plain".into()),
            html: None,
            link: None,
            in_reply_to: None,
        }
    }

    fn account() -> Account {
        Account {
            service_id: ServiceId::from_uuid(uuid::Uuid::now_v7()),
            provider: Provider::Sandbox,
            username: "news@example.com".into(),
            name: "Example News".into(),
            credentials: Credentials::Sandbox,
        }
    }

    /// The `.eml` file the id names, read back.
    fn written(dir: &std::path::Path, accepted: &Accepted) -> String {
        let id = accepted.provider_message_id.as_deref().unwrap();
        std::fs::read_to_string(dir.join(format!("{id}.eml"))).unwrap()
    }

    #[tokio::test]
    async fn an_email_is_its_own_eml_file_named_by_its_id_in_a_directory_made_when_missing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("outbox").join("emails");
        let sandbox = SandboxProvider::new(dir.clone());
        let message = email();
        let first = sandbox.send(&account(), &message).await.unwrap();
        let id = first.provider_message_id.as_deref().unwrap();
        assert!(
            uuid::Uuid::parse_str(id).is_ok(),
            "a UUID, as lettre names it: {id}"
        );
        let text = written(&dir, &first);
        assert!(text.contains("Subject: Hello"), "{text}");
        assert!(text.contains(&format!("Message-ID: <{}@example.com>", message.message_id)));
        // A second email is a second file.
        let second = sandbox.send(&account(), &email()).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        // The directory removed meanwhile is made again.
        std::fs::remove_dir_all(root.path().join("outbox")).unwrap();
        let third = sandbox.send(&account(), &email()).await.unwrap();
        assert!(written(&dir, &third).contains("Subject: Hello"));
        // A post too, by the same write.
        std::fs::remove_dir_all(root.path().join("outbox")).unwrap();
        let post = OutgoingMessage {
            channel: Channel::Twitter,
            text: Some("Spring is here".into()),
            ..email()
        };
        let posted = sandbox.send(&account(), &post).await.unwrap();
        let line = std::fs::read_to_string(sandbox.posts_file()).unwrap();
        assert!(
            line.contains(posted.provider_message_id.as_deref().unwrap()),
            "{line}"
        );
        // A path under a file cannot be written: a passing failure, not a lost message.
        let blocked = root.path().join("a-file");
        std::fs::write(&blocked, b"").unwrap();
        let error = SandboxProvider::new(blocked.join("emails"))
            .send(&account(), &email())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Transient { .. }), "{error:?}");
    }
}
