"""The page of `scenebreak ui`: a local web page to make masks by clicking, learn and
generate. `app` holds what the page may do (each action one library call the command
line also makes; the folders it may touch), `jobs` runs the long ones in a thread and
keeps their progress records, `server` speaks HTTP (the standard library's
ThreadingHTTPServer: no dependency), `static/` is the page itself (plain HTML, CSS and
JavaScript, no build step, nothing fetched from the network).
May import: evaluation, exports, train, sample, masks, scenes, families and the ground
modules."""
