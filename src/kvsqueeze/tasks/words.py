"""Plain English words for the procedural haystack, RULER-style keys and the word-list tasks (offline, no package)."""

NOUNS = """
account acid adult age air amount animal answer apple area arm army art attack baby back bag ball band bank base
basket bath beach bean bear bed bell belt bench bird birth blade block blood board boat body bone book boot border
bottle box boy brain branch bread breath brick bridge brother brush bucket building bulb button cabin cake camera
camp canal candle cap car card carpet cart castle cat cattle cave chain chair chalk channel cheese chest chicken
child church circle city class clock cloth cloud coal coast coat coin collar colour comb company copper corn cotton
country cover cow crack crowd crown cup current curtain cushion dance day desert desk dinner dog door drawer dress
drink driver drop drum dust ear earth edge egg engine eye face factory family farm father feather fence field finger
fire fish flag flame floor flower fly fog food foot forest fork fountain frame friend fruit game garden gate glass
glove goat gold grain grass group guide gun hair hammer hand harbor hat head heart hill hole hook horn horse hospital
house island jewel journey judge kettle key king kitchen knee knife knot ladder lake lamp land lantern leaf leather
letter library light lily line lion lock machine map market meadow meal metal mill mirror money monkey moon morning
mother mountain mouth muscle music nail needle nest net night nose note ocean office orange oven owl page pail paint
paper park pencil piano picture pig pin pipe plane planet plant plate pocket poem pond pot potato prison pump queen
rabbit rail rain river road rock roof room root rope rose sail salt sand school scissors screw sea seat seed sheep
shelf ship shirt shoe shop silver sister skin skirt sky snake snow sock soldier song soup spade sponge spoon spring
square stage star station steam stem stick stone store storm street string sugar summer sun swan table tail teacher
tent thread throat thumb ticket tiger toe tongue tooth tower town toy train tray tree truck tunnel umbrella valley
village violin wagon wall watch water wave wheel whistle window wing winter wire wolf woman wood wool word worm yard
""".split()

ADJECTIVES = """
able ancient angry bitter black blue bold brave bright broad brown busy calm careful cheap clean clever cold common
cool curious damp dark deep dry dull eager early easy empty faint fair famous fancy fast fierce flat fresh friendly
gentle giant glad golden grand gray great green happy hard heavy hidden high hollow honest huge humble icy jolly
kind large late lazy light little lively long loud lovely low lucky mighty modern narrow neat new noisy old orange
pale patient plain polite poor proud purple quick quiet rapid rare red rich rough round royal rusty sad safe sharp
shiny short silent simple slow small smooth soft solid sour steady steep strange strong sudden sweet swift tall tame
thick thin tidy tiny tough warm weak wet white wide wild wise wooden yellow young
""".split()

VERBS_PAST = """
built carried chased cleaned closed covered crossed found followed gathered guarded held joined lifted moved opened
painted passed pulled pushed reached repaired saw shared showed visited warmed watched washed welcomed wrapped
""".split()

PREPOSITIONS = "near behind beside under above across along around beyond inside".split()
