-- Per-canon TLS for https cells: a CA bundle (PEM) that verifies the cell's
-- certificate instead of the public roots, and a client certificate (PEM) for
-- mutual TLS whose private key is stored sealed under the master key
-- (enc:v1:…, secrets/), never in clear.
ALTER TABLE canons ADD COLUMN tls_ca_pem TEXT;
ALTER TABLE canons ADD COLUMN tls_client_cert_pem TEXT;
ALTER TABLE canons ADD COLUMN tls_client_key TEXT;
