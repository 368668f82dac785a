-- A claim of outbox rows names the relay that made it (#12). A relay whose database
-- link stalled cannot tell whether its claim was made: at its next round it takes back
-- the rows it claimed itself, at once, instead of waiting for the claim to expire while
-- nobody publishes them. Other relays still wait for the expiry.
ALTER TABLE status_outbox ADD COLUMN claimed_by TEXT;
