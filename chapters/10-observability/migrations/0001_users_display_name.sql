-- Deploy 1, expand: the column the new code reads. Nullable and without a
-- default, so adding it changes the catalog only, never the rows.
SET lock_timeout = '1s';
SET statement_timeout = '5s';

ALTER TABLE users ADD COLUMN display_name text;

-- Old code writes name, new code writes display_name: while both run,
-- each row gets both, whoever wrote it.
CREATE FUNCTION users_sync_display_name() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.display_name := coalesce(NEW.display_name, NEW.name);
        NEW.name := coalesce(NEW.name, NEW.display_name);
    ELSIF NEW.name IS DISTINCT FROM OLD.name THEN
        NEW.display_name := NEW.name;
    ELSIF NEW.display_name IS DISTINCT FROM OLD.display_name THEN
        NEW.name := NEW.display_name;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER users_sync_display_name
    BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_display_name();
