//! Process managers: the only place side effects happen. They react to the schedule and the
//! send queue (tables derived from the log), call providers, and record every outcome as a
//! command on the message.

pub mod push;
pub mod scheduler;
pub mod sender;
