-- Deploy 2, contract, step 1: a check that new rows must pass at once and
-- old ones are not scanned for, so this holds its lock for an instant.
SET lock_timeout = '1s';
SET statement_timeout = '5s';

ALTER TABLE users ADD CONSTRAINT users_display_name_not_null
    CHECK (display_name IS NOT NULL) NOT VALID;
