-- The NATS JetStream relay's position per tenant (events/relay.rs): every event
-- of the tenant up to relayed_seq has been acknowledged by JetStream. It only
-- moves up, and only past events whose acknowledgement came back, so a relay
-- that stops anywhere resumes from here; what it sends again is absorbed by
-- the stream's duplicate window (each message's Nats-Msg-Id is the event id).
--
-- On PostgreSQL a relay holds its tenant's row locked (FOR UPDATE SKIP LOCKED)
-- while it relays one batch, so of several kernels only one relays a tenant
-- at a time and the tenant's events reach the stream in seq order.
-- updated_at orders tenants least recently relayed first, so no tenant waits
-- behind the others when many have events to relay.
CREATE TABLE event_relay_positions (
    tenant_id    TEXT    NOT NULL PRIMARY KEY REFERENCES tenants (id),
    relayed_seq  INTEGER  NOT NULL CHECK (relayed_seq >= 0),
    updated_at   TEXT    NOT NULL
);
