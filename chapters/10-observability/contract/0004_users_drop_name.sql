-- Deploy 2, contract, step 2: only once no replica of the old code is
-- left, since the old code still selects name.
SET lock_timeout = '1s';
SET statement_timeout = '5s';

-- The scan, under a lock that lets reads and writes go on; SET NOT NULL
-- then trusts the valid check and skips its own scan (PostgreSQL 12+).
ALTER TABLE users VALIDATE CONSTRAINT users_display_name_not_null;
ALTER TABLE users ALTER COLUMN display_name SET NOT NULL;
-- (NOT NULL now says the same, without a check to evaluate per row)
-- squawk-ignore ban-drop-constraint
ALTER TABLE users DROP CONSTRAINT users_display_name_not_null;
DROP TRIGGER users_sync_display_name ON users;
-- (only the trigger above called it: no old writer is left)
-- squawk-ignore ban-drop-function
DROP FUNCTION users_sync_display_name();
-- (the reason for two deploys: no code that reads it still runs)
-- squawk-ignore ban-drop-column
ALTER TABLE users DROP COLUMN name;
