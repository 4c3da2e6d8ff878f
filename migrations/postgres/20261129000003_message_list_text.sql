-- The message list's `message` is written by the service alone, from its own serializer, and
-- read back whole (`message::text`), never queried inside (see 20261126000005): as `text` it is
-- stored as it comes. As `json` PostgreSQL validated every row it was given, character by
-- character: in psql, 100k rows of about 1.1 KB (the bench's) took 0.95-1.16 s to INSERT with
-- `::json` against 0.62-0.68 s as text, and every batch of the list's projection (and every
-- row of a rebuild) paid it. SQLite's column has always been TEXT. A psql reader wanting its
-- fields casts it: `message::json ->> 'state'`.
-- The table is rewritten once (json to text goes through each value's text), under a lock
-- that holds readers and the projection back for as long as that takes.
ALTER TABLE message_list ALTER COLUMN message TYPE text USING message::text;
