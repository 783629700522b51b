ALTER TABLE routes DROP COLUMN public_to_authenticated;
