DROP TABLE event_relay_positions;
