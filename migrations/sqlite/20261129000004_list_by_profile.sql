-- The list filtered by a profile alone ("messages with ann@example.com") is read as one range
-- of this table's key, newest first, instead of walking the whole list and looking inside each
-- row's JSON array of profiles (70 ms a page for a profile in a few of 200k messages; 0.1 ms
-- this way). The list's projection writes a message's pairs when it writes the message's row
-- first: a message's profiles (its sender and recipients) are set by its first event and never
-- change. With another filter the list is still read through that filter's index (without
-- statistics SQLite cannot tell which side is narrower, and a profile in every message, the
-- sender's, would walk them all).
CREATE TABLE message_list_profiles (
    profile    TEXT NOT NULL,
    message_id BLOB NOT NULL,
    PRIMARY KEY (profile, message_id)
) WITHOUT ROWID;

INSERT OR IGNORE INTO message_list_profiles (profile, message_id)
    SELECT p.value, m.message_id FROM message_list m, json_each(m.profiles) p;
