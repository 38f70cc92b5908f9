-- Usage metering: per-minute rollups for billing, and the batch ids
-- already applied (a retried batch is recognised and not counted twice).

CREATE TABLE usage_batches (
    batch_id    text        PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    records     integer     NOT NULL,
    metrics     integer     NOT NULL
);

CREATE TABLE usage_minute (
    minute          timestamptz NOT NULL,
    tenant          text        NOT NULL,
    route           text        NOT NULL,
    method          text        NOT NULL,
    status_class    text        NOT NULL,
    requests        bigint      NOT NULL,
    request_bytes   bigint      NOT NULL,
    response_bytes  bigint      NOT NULL,
    duration_us_sum bigint      NOT NULL,
    duration_us_max bigint      NOT NULL,
    PRIMARY KEY (minute, tenant, route, method, status_class)
);

CREATE INDEX usage_minute_tenant ON usage_minute (tenant, minute);

CREATE TABLE app_metric_minute (
    minute timestamptz      NOT NULL,
    name   text             NOT NULL,
    labels jsonb            NOT NULL,
    count  bigint           NOT NULL,
    sum    double precision NOT NULL,
    min    double precision NOT NULL,
    max    double precision NOT NULL,
    PRIMARY KEY (minute, name, labels)
);
