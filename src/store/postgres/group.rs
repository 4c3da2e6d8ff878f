//! Group commit for client commands: commands that arrive while others are being appended are
//! appended together, as one [`batch::execute_each`] (one read of the messages that need it,
//! one INSERT, one commit), instead of one statement and one WAL flush each.
//!
//! Nothing waits to fill a group: each of two writers takes commands from its own queue; a
//! writer that finds its queue empty appends its one command at once, and under load it takes
//! whatever queued up while it was busy (at most [`MOST`]). A message's commands always go to
//! the same writer (by its id), in the order they came: the two writers never race on one
//! message, so a command is decided against the message as the commands before it left it,
//! and its caller gets that fold back (not a read that a later command could overtake). A
//! group never holds two commands on one message (the second waits for the next group).
//! Every caller gets its own command's result: a rejected command fails alone, and any
//! failure of the group's append falls back to one command at a time (see [`batch`]).
//!
//! Each writer appends on a connection of its own, outside the pool
//! ([`KeptConnection`]: no check round trips around each group's INSERT and read, whose plans
//! are made once), opened again after any failure of the connection itself (anything but an
//! error the server reported for the statement alone).

use super::batch;
use crate::metrics::Metrics;
use crate::store::commands::MessageCqrs;
use crate::store::CommandError;
use messaging_domain::{MessageCommand, MessageId};
use messaging_projections::KeptConnection;
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Groups appended at the same time: a writer reads the next group while others commit.
const WRITERS: usize = 2;
/// The most commands in one group.
const MOST: usize = 256;
/// Commands waiting for a writer before callers wait to queue theirs.
const QUEUED: usize = 4096;
/// What the writers need: the pool, and cqrs-es for the fallback.
pub(super) struct Shared {
    pub pool: PgPool,
    pub cqrs: MessageCqrs<PostgresEventRepository>,
    pub metrics: Option<Arc<Metrics>>,
    /// Wakes the commit notifier. Rung by the writer, not by the caller: a caller dropped
    /// while its group commits (a client that went away) must not leave every instance's
    /// readers to their next poll.
    pub committed: Arc<tokio::sync::Notify>,
    /// The folds this process last decided messages to, or read them at (see
    /// [`batch::execute_each`]): a later command on one reads nothing first.
    pub folds: std::sync::Mutex<messaging_projections::Folds>,
}

type Answer = oneshot::Sender<batch::Outcome>;
type Queued = (MessageId, MessageCommand, Answer);

/// The writers' queues' sending ends. The writers stop once they are dropped (with the store).
pub(super) struct Group {
    queues: Vec<mpsc::Sender<Queued>>,
}

impl Group {
    /// Starts the writers (on the current Tokio runtime).
    pub fn start(shared: Arc<Shared>) -> Self {
        let mut queues = Vec::with_capacity(WRITERS);
        for _ in 0..WRITERS {
            let (queue, receiver) = mpsc::channel(QUEUED / WRITERS);
            queues.push(queue);
            // Behind a lock only so that a writer started again after a panic takes it over.
            let receiver = Arc::new(Mutex::new(receiver));
            let shared = shared.clone();
            tokio::spawn(async move {
                // A writer that panicked (a bug) is started again: its group's callers got an
                // error, the others must not lose a writer.
                loop {
                    match tokio::spawn(write(shared.clone(), receiver.clone())).await {
                        Err(error) if error.is_panic() => {
                            tracing::error!(%error, "a command writer panicked; starting another")
                        }
                        _ => return,
                    }
                }
            });
        }
        Self { queues }
    }

    /// The command's result, with the fold it was decided against and its new events when
    /// the writer decided it (see [`batch::Outcome`]).
    pub async fn execute(&self, id: MessageId, command: MessageCommand) -> batch::Outcome {
        let (answer, answered) = oneshot::channel();
        // A UUID's last bits are random (a UUIDv7's too): the writers share the messages evenly.
        let writer = (id.as_uuid().as_u128() % self.queues.len() as u128) as usize;
        self.queues[writer]
            .send((id, command, answer))
            .await
            .map_err(|_| CommandError::Store("the command writers have stopped".into()))?;
        answered.await.map_err(|_| {
            CommandError::Store("the command writers stopped before answering".into())
        })?
    }
}

/// One writer: takes a group from the queue, appends it, answers each caller.
async fn write(shared: Arc<Shared>, receiver: Arc<Mutex<mpsc::Receiver<Queued>>>) {
    // Its statements are the group's INSERT (a plan that holds whatever the tables hold) and
    // the read of the messages, by primary key: it keeps its plans, with scans disabled.
    let mut own = KeptConnection::keeping_plans();
    write_groups(&shared, &receiver, &mut own).await;
    own.close().await;
}

async fn write_groups(
    shared: &Shared,
    receiver: &Mutex<mpsc::Receiver<Queued>>,
    own: &mut KeptConnection,
) {
    // A command on a message already in the group: the first of this writer's next group.
    let mut held: Option<Queued> = None;
    loop {
        let mut group = Vec::new();
        {
            // This writer's own queue: the lock is never contended.
            let mut queue = receiver.lock().await;
            match held.take() {
                Some(first) => group.push(first),
                None => match queue.recv().await {
                    Some(first) => group.push(first),
                    None => return,
                },
            }
            let mut ids: HashSet<MessageId> = group.iter().map(|(id, _, _)| *id).collect();
            while group.len() < MOST {
                let Ok(next) = queue.try_recv() else {
                    break;
                };
                if ids.insert(next.0) {
                    group.push(next);
                } else {
                    held = Some(next);
                    break;
                }
            }
        }
        let (commands, answers): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|(id, command, answer)| ((id, command), answer))
            .unzip();
        let results = match own.ready(&shared.pool).await {
            Ok(conn) => {
                let (results, connection_failed) =
                    batch::execute_each(shared, batch::On::Kept(conn), commands).await;
                if connection_failed {
                    // The next group opens a new one.
                    own.discard();
                }
                results
            }
            // Nothing was sent: the pool's connections may still serve.
            Err(error) => {
                tracing::warn!(%error, "a command writer cannot connect; using the pool");
                batch::execute_each(shared, batch::On::Pool(&shared.pool), commands)
                    .await
                    .0
            }
        };
        if results.iter().any(batch::may_have_appended) {
            shared.committed.notify_one();
        }
        // A caller that went away no longer wants its answer.
        for (answer, result) in answers.into_iter().zip(results) {
            let _ = answer.send(result);
        }
    }
}
