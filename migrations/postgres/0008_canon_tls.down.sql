ALTER TABLE canons DROP COLUMN tls_client_key;
ALTER TABLE canons DROP COLUMN tls_client_cert_pem;
ALTER TABLE canons DROP COLUMN tls_ca_pem;
