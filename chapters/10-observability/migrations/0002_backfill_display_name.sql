-- migrate: no-transaction
-- Deploy 1, backfill: a thousand rows per transaction, so no row stays
-- locked for long, and a run stopped halfway goes on where it stopped.
SET lock_timeout = '1s';
SET statement_timeout = '60s';

DO $$
DECLARE
    changed integer;
BEGIN
    LOOP
        UPDATE users SET display_name = name
        WHERE id IN (
            SELECT id FROM users WHERE display_name IS NULL
            ORDER BY id LIMIT 1000
        );
        GET DIAGNOSTICS changed = ROW_COUNT;
        COMMIT;
        EXIT WHEN changed = 0;
    END LOOP;
END $$;
