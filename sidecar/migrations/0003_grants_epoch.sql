-- The grants' epoch (issue 17, the feed): random text set once, naming
-- this database's line of versions. Every replica and every restart reads
-- the same one, so a caller's (epoch, version) stays meaningful across
-- them; a database restored from a backup (versions going back) should be
-- given a new one: UPDATE grants_version SET epoch = 'pg-' || ...

ALTER TABLE grants_version ADD COLUMN epoch text;
UPDATE grants_version
   SET epoch = 'pg-' || substr(md5(random()::text || clock_timestamp()::text), 1, 16);
ALTER TABLE grants_version ALTER COLUMN epoch SET NOT NULL;
