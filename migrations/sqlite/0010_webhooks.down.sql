DROP TABLE webhook_attempts;
DROP TABLE webhook_deliveries;
DROP TABLE webhook_subscriptions;
DELETE FROM permissions WHERE name = 'kernel.subscription.read';
