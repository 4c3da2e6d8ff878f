-- The list filtered by both a service and a state (a service's failed messages, say) is read
-- as one range of this index, newest first, instead of walking all of the service's messages
-- (or all messages in that state) for the few that match both. SQLite keeps no statistics
-- here, so it could not tell which of the two single-column indexes is the narrower.
CREATE INDEX message_list_service_state ON message_list (service_id, state, message_id DESC);
