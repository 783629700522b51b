DROP TABLE routes;
DROP TABLE canon_assertion_secrets;
DROP TABLE canons;
DELETE FROM permissions WHERE owner <> 'kernel';
