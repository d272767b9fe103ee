-- pwmail's user database (docs/database.md). `pwmail db init DSN` runs this
-- file; running it again changes nothing (every statement is idempotent), and
-- it may also be run by hand: psql -v ON_ERROR_STOP=1 -1 -f schema.sql.
--
-- Everything lives in the schema `pwmail`. The rules that keep a site valid
-- are constraints here, so that every writer (pwmail user, provisioning
-- scripts, psql by hand) is held to them, not only our tools.

CREATE SCHEMA IF NOT EXISTS pwmail;

-- Concurrent inits wait for each other instead of racing on CREATE.
SELECT pg_advisory_xact_lock(hashtext('pwmail.schema'));

-- A name that can be a login, a group and a mailbox directory: 1 to 255
-- printable ASCII characters without space, '/' or ':', not starting with a
-- dot, '+' or '-' (delivery/layout.py check_user; ':' separates passwd(5)
-- fields; '+' and '-' start NIS compat lines, which pwserver skips in files).
CREATE OR REPLACE FUNCTION pwmail.valid_name(name text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN name ~ '^[!-~]+$' AND octet_length(name) <= 255 AND strpos(name, '/') = 0 AND strpos(name, ':') = 0
           AND left(name, 1) NOT IN ('.', '+', '-');

-- A passwd(5)/shadow(5) field: anything but ':' and line ends.
CREATE OR REPLACE FUNCTION pwmail.valid_field(value text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN value !~ '[:\n\r]';

CREATE TABLE IF NOT EXISTS pwmail.users (
    name          text    NOT NULL,
    uid           bigint  NOT NULL,
    gid           bigint  NOT NULL,
    gecos         text    NOT NULL DEFAULT '',
    home          text    NOT NULL,
    shell         text    NOT NULL DEFAULT '/usr/sbin/nologin',
    -- shadow(5): NULL password_hash = no shadow entry; NULL numbers = empty fields
    password_hash text,
    last_change   bigint,
    min_days      bigint,
    max_days      bigint,
    warn_days     bigint,
    inactive_days bigint,
    expire_day    bigint,
    shadow_flag   bigint,
    -- placement: NULL mailhost = the server's default rule ([placement])
    mailhost      text,
    frozen        boolean NOT NULL DEFAULT false,
    quota_bytes   bigint,   -- NULL = no quota
    CONSTRAINT users_name_key PRIMARY KEY (name),
    CONSTRAINT users_uid_key UNIQUE (uid),
    CONSTRAINT users_name_valid CHECK (pwmail.valid_name(name)),
    CONSTRAINT users_uid_range CHECK (uid BETWEEN 0 AND 4294967294),
    CONSTRAINT users_gid_range CHECK (gid BETWEEN 0 AND 4294967294),
    CONSTRAINT users_fields_valid CHECK (pwmail.valid_field(gecos) AND pwmail.valid_field(home)
                                         AND pwmail.valid_field(shell)
                                         AND pwmail.valid_field(coalesce(password_hash, ''))),
    CONSTRAINT users_mailhost_valid CHECK (mailhost ~ '^[!-~]+$' AND octet_length(mailhost) <= 255
                                           AND left(mailhost, 1) <> '#'),
    CONSTRAINT users_frozen_needs_mailhost CHECK (NOT frozen OR mailhost IS NOT NULL),
    CONSTRAINT users_quota_valid CHECK (quota_bytes >= 0)
);
-- Juan and juan would share one mailbox (names are lower-cased for paths).
CREATE UNIQUE INDEX IF NOT EXISTS users_mailbox_key ON pwmail.users (lower(name));

CREATE TABLE IF NOT EXISTS pwmail.groups (
    name text   NOT NULL,
    gid  bigint NOT NULL,
    CONSTRAINT groups_name_key PRIMARY KEY (name),
    CONSTRAINT groups_gid_key UNIQUE (gid),
    CONSTRAINT groups_name_valid CHECK (pwmail.valid_name(name)),
    CONSTRAINT groups_gid_range CHECK (gid BETWEEN 0 AND 4294967294)
);

-- Supplementary groups (group(5)'s member list). `position` keeps each
-- group's member order, so an export gives back the file that was imported.
CREATE TABLE IF NOT EXISTS pwmail.members (
    group_name text   NOT NULL REFERENCES pwmail.groups (name) ON UPDATE CASCADE ON DELETE CASCADE,
    user_name  text   NOT NULL REFERENCES pwmail.users (name) ON UPDATE CASCADE ON DELETE CASCADE,
    position   bigint GENERATED ALWAYS AS IDENTITY,
    CONSTRAINT members_key PRIMARY KEY (group_name, user_name)
);
CREATE INDEX IF NOT EXISTS members_user ON pwmail.members (user_name);

-- The change log: one row per changed row of the three tables, in commit
-- order. A follower remembers the last seq it applied, LISTENs on the
-- channel `pwmail_changes` (payload: the last seq of the transaction) and,
-- on a notification or after reconnecting, reads every row past its seq.
-- `name` is the user or group; `member` the user of a membership; `old_name`
-- the name before a rename. The row itself is read from its table: the log
-- says what changed, the tables say what is true now.
CREATE TABLE IF NOT EXISTS pwmail.changes (
    seq      bigint      NOT NULL,
    xid      xid8        NOT NULL DEFAULT pg_current_xact_id(),
    at       timestamptz NOT NULL DEFAULT now(),
    kind     text        NOT NULL CHECK (kind IN ('user', 'group', 'member')),
    op       text        NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    name     text        NOT NULL,
    member   text,
    old_name text,
    CONSTRAINT changes_seq_key PRIMARY KEY (seq)
);
CREATE SEQUENCE IF NOT EXISTS pwmail.changes_seq AS bigint OWNED BY pwmail.changes.seq;

-- Sequence numbers must follow commit order, or a follower that saw seq 8
-- would skip a seq 7 committed after it. Writers to the log therefore take
-- one transaction lock before drawing numbers: transactions that change
-- users commit one after the other (they are short; a bulk import holds it
-- for its duration).
CREATE OR REPLACE FUNCTION pwmail.log_lock() RETURNS void LANGUAGE sql
    AS $$ SELECT pg_advisory_xact_lock(hashtext('pwmail.changes')) $$;

-- Inserts and deletes are logged per statement, from the transition table
-- (a COPY of a million rows logs them with one INSERT ... SELECT). Trigger
-- arguments: the kind, then the expressions giving `name` and `member`.
CREATE OR REPLACE FUNCTION pwmail.log_rows() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last bigint;
BEGIN
    PERFORM pwmail.log_lock();
    EXECUTE format('INSERT INTO pwmail.changes (seq, kind, op, name, member)
                    SELECT nextval(''pwmail.changes_seq''), %L, %L, %s, %s FROM %I',
                   TG_ARGV[0], lower(TG_OP), TG_ARGV[1], TG_ARGV[2],
                   CASE TG_OP WHEN 'DELETE' THEN 'old_rows' ELSE 'new_rows' END);
    SELECT max(seq) INTO last FROM pwmail.changes;
    PERFORM pg_notify('pwmail_changes', last::text);
    RETURN NULL;
END $$;

-- Updates are logged per row: only a row trigger sees which old row became
-- which new one. A renamed user or group is an update with old_name; a
-- changed membership (a rename cascading, or by hand) is the old pair's
-- delete and the new pair's insert. Rows updated to what they were are not logged.
CREATE OR REPLACE FUNCTION pwmail.log_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD IS NOT DISTINCT FROM NEW THEN
        RETURN NULL;
    END IF;
    PERFORM pwmail.log_lock();
    IF TG_TABLE_NAME = 'members' THEN
        INSERT INTO pwmail.changes (seq, kind, op, name, member) VALUES
            (nextval('pwmail.changes_seq'), 'member', 'delete', OLD.group_name, OLD.user_name),
            (nextval('pwmail.changes_seq'), 'member', 'insert', NEW.group_name, NEW.user_name);
    ELSE
        INSERT INTO pwmail.changes (seq, kind, op, name, old_name) VALUES
            (nextval('pwmail.changes_seq'), TG_ARGV[0], 'update', NEW.name,
             CASE WHEN OLD.name <> NEW.name THEN OLD.name END);
    END IF;
    PERFORM pg_notify('pwmail_changes', currval('pwmail.changes_seq')::text);
    RETURN NULL;
END $$;

-- The same three triggers on each table: (table, kind, name, member).
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT * FROM (VALUES ('users', 'user', 'name', 'NULL'), ('groups', 'group', 'name', 'NULL'),
                                   ('members', 'member', 'group_name', 'user_name')) v (tbl, kind, name, member)
    LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_log_insert AFTER INSERT ON pwmail.%1$I '
                       'REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION pwmail.log_rows(%2$L, %3$L, %4$L)', t.tbl, t.kind, t.name, t.member);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_log_delete AFTER DELETE ON pwmail.%1$I '
                       'REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT '
                       'EXECUTE FUNCTION pwmail.log_rows(%2$L, %3$L, %4$L)', t.tbl, t.kind, t.name, t.member);
        EXECUTE format('CREATE OR REPLACE TRIGGER %1$s_log_update AFTER UPDATE ON pwmail.%1$I '
                       'FOR EACH ROW EXECUTE FUNCTION pwmail.log_update(%2$L)', t.tbl, t.kind);
    END LOOP;
END $$;
