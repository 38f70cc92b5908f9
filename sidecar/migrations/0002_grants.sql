-- Entitlement grants (issue 17): (holder, resource, action), the holder a
-- tenant or a subject; every change in the audit with its actor, before
-- and after; one version counter, bumped by every change and announced
-- with NOTIFY grants_changed.

CREATE TABLE grants (
    holder_kind text        NOT NULL CHECK (holder_kind IN ('tenant', 'subject')),
    holder      text        NOT NULL,
    resource    text        NOT NULL,
    action      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL,
    PRIMARY KEY (holder_kind, holder, resource, action)
);

-- A lookup reads one holder's grants (the primary key's prefix serves it);
-- an audit of a resource across holders uses this one.
CREATE INDEX grants_resource ON grants (resource, action);

CREATE TABLE grants_audit (
    id          bigserial   PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    op          text        NOT NULL CHECK (op IN ('put', 'delete')),
    holder_kind text        NOT NULL,
    holder      text        NOT NULL,
    resource    text        NOT NULL,
    action      text        NOT NULL,
    before      jsonb,
    after       jsonb,
    version     bigint      NOT NULL
);

CREATE INDEX grants_audit_at ON grants_audit (at);

CREATE TABLE grants_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);

INSERT INTO grants_version (version) VALUES (0);
