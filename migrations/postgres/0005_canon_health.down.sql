DROP TABLE canon_health;
