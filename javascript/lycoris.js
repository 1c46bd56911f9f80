// lycoris-loader: make the host's card toggle and Ctrl+Up/Down weight editing work on tags with named items
// and schedules, e.g. <lora:name:0.8:unet=0.5> or <lora:name:0.2@0,1@10:hr=0.5>.
// The host only understands <lora:name:NUMBER>; everything else about its behaviour is kept.
(function() {
    // Card toggle (extraNetworks.js): match <kind:name...> whatever follows the name; m[1] is "kind:name",
    // m[2] the text after the tag (the activation text the card adds).
    var reOne = /<([^:^>]+:[^:>]+)(?::[^>]*)?>(.*)/;
    var reAll = /<([^:^>]+:[^:>]+)(?::[^>]*)?>/g;

    function installToggle() {
        if (typeof re_extranet !== "undefined") {
            re_extranet = reOne; // eslint-disable-line no-global-assign
            re_extranet_g = reAll; // eslint-disable-line no-global-assign
        }
    }
    installToggle();
    if (typeof onUiLoaded === "function") onUiLoaded(installToggle);

    var reNumber = /^\s*-?(\d+\.?\d*|\.\d+)\s*$/;
    var reKeyframe = /(-?(?:\d+\.?\d*|\.\d+))(\s*[@~][^,;]*)?/g;

    function round(x) {
        var w = parseFloat(x.toPrecision(12));
        return Number.isInteger(w) ? w + ".0" : String(w);
    }

    // New item text for a strength item (a number or a schedule "w@pos,w@pos"), moved by delta.
    function shift(item, delta) {
        if (reNumber.test(item)) return round(parseFloat(item) + delta);
        return item.replace(reKeyframe, function(all, w, at) {
            return round(parseFloat(w) + delta) + (at || "");
        });
    }

    // The tag around the caret in text, or null: {start, end, items} with start/end the positions of < and >.
    function tagAt(text, caret) {
        var open = text.lastIndexOf("<", caret - 1);
        if (open < 0) return null;
        var close = text.indexOf(">", open);
        if (close < 0 || caret > close + 1) return null;
        var body = text.substring(open + 1, close);
        if (!/^(lora|lyco):/i.test(body) || body.indexOf("<") >= 0) return null;
        return {start: open, end: close, items: body.split(":")};
    }

    // Index of the strength item: the first positional after the name, else te=.
    function strengthIndex(items) {
        if (items.length > 2 && items[2].indexOf("=") < 0) return 2;
        for (var i = 2; i < items.length; i++) {
            if (/^\s*te\s*=/i.test(items[i])) return i;
        }
        return items.length > 2 ? -1 : 2;
    }

    function onKey(event) {
        if (!(event.metaKey || event.ctrlKey)) return;
        var isPlus = event.key == "ArrowUp";
        if (!isPlus && event.key != "ArrowDown") return;
        var target = event.originalTarget || event.composedPath()[0];
        if (!target.matches || !target.matches("*:is([id*='_toprow'] [id*='_prompt'], .prompt) textarea")) return;
        if (target.selectionStart !== target.selectionEnd) return;
        var text = target.value;
        var tag = tagAt(text, target.selectionStart);
        if (!tag) return;
        var items = tag.items;
        // Plain <kind:name:NUMBER> (or no weight): the host's handler does it as before.
        if (items.length <= 3 && (items.length < 3 || reNumber.test(items[2]))) return;
        var i = strengthIndex(items);
        if (i < 0) return;
        var delta = (typeof opts !== "undefined" && opts.keyedit_precision_extra) || 0.05;
        delta = isPlus ? delta : -delta;
        if (items[i].indexOf("=") >= 0) {
            var eq = items[i].indexOf("=");
            items[i] = items[i].substring(0, eq + 1) + shift(items[i].substring(eq + 1), delta);
        } else {
            items[i] = shift(items[i], delta);
        }
        event.preventDefault();
        event.stopImmediatePropagation();
        var caret = target.selectionStart;
        target.value = text.substring(0, tag.start + 1) + items.join(":") + text.substring(tag.end);
        target.selectionStart = target.selectionEnd = Math.min(caret, tag.start + 1 + items.join(":").length);
        if (typeof updateInput === "function") updateInput(target);
    }

    // Capture phase on window: runs before the host's (bubbling) keydown listener.
    window.addEventListener("keydown", onKey, true);

    if (typeof module !== "undefined") module.exports = {shift: shift, tagAt: tagAt, strengthIndex: strengthIndex,
        reOne: reOne, reAll: reAll};
})();
