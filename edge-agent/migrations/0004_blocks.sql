-- Spool schema, version 4: a row holds a block of consecutive events of one source, packed as a
-- batch payload (a zstd frame of the events' JSON lines), so that a source's commit is one row
-- per block rather than per event and the shipper sends a block without packing it again. The
-- key is still (source_no << 40) | seq of the block's first event; the row covers seqs
-- seq .. seq + n. Rows spooled before version 4 hold one event's JSON (packed = 0).
ALTER TABLE events ADD COLUMN n INTEGER NOT NULL DEFAULT 1;          -- events in the row
ALTER TABLE events ADD COLUMN packed INTEGER NOT NULL DEFAULT 0;     -- 1: body is a zstd frame of JSON lines
ALTER TABLE events ADD COLUMN raw_bytes INTEGER NOT NULL DEFAULT 0;  -- bytes of the events' JSON (what max_bytes limits)
ALTER TABLE events ADD COLUMN max_len INTEGER NOT NULL DEFAULT 0;    -- bytes of the row's largest event
UPDATE events SET raw_bytes = length(body), max_len = length(body);
